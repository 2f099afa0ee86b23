"""The errors `tidar.train` raises for bad input: each message says what is wrong and what to do.

The CLI shows them as one `error: ...` line (exit status 2), never as a traceback."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input (source spec, shard directory, split) with a message that says what to do."""


class TrainConfigError(ValueError):
    """A training setup that would fail or do something other than asked; raised before any work."""


class ExportError(ValueError):
    """An export that cannot be made as asked (a bad operating point or data description)."""
