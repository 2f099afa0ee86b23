"""The Hugging Face export's error, light to import (the CLI reports it as one line)."""


class HFExportError(ValueError):
    """A model or destination that cannot be exported as a transformers directory."""
