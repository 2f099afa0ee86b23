"""TiDAR's transformers config: a Llama config plus one `tidar` entry.

`tidar` = {"mask_token_id": id one past the vocabulary, "block_size": the draft length b the adapter
was trained for, "adapter": {"rank", "alpha", "targets", "layers"} or null}. It is a plain dict (an
extra config attribute) so this file stays a subclass with no fields of its own: it runs wherever
`transformers` does, `tidar` need not be installed.
"""

from transformers import LlamaConfig


class TidarConfig(LlamaConfig):
    model_type = "tidar"

    def tidar_settings(self) -> dict:
        """The `tidar` entry with its defaults filled in (a config made by hand may lack it)."""
        settings = {"mask_token_id": self.vocab_size, "block_size": 4, "adapter": None}
        settings.update(getattr(self, "tidar", None) or {})
        return settings
