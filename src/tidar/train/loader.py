"""Reading token shards, and the deterministic batches training and evaluation take from them.

Layout of a shard directory (written by `tidar.train.shards` and `tidar.train.selfgen`)::

    out_dir/train.bin   flat token ids (uint16 or uint32), documents separated by eos_id
    out_dir/val.bin     same, held-out files only
    out_dir/index.json  dtype, vocab, eos, seed, split file lists and token counts

Batches are a pure function of (seed, step, rank), which makes resumed and data-parallel training
exact without any loader state to checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tidar.train.errors import DataError

__all__ = ["INDEX_FILE", "SPLITS", "TokenShards", "batch_at", "read_index", "val_batches"]

SPLITS = ("train", "val")
INDEX_FILE = "index.json"


def read_index(directory: str | Path) -> dict[str, Any]:
    """A shard directory's index.json, checked for the fields a reader needs."""
    index_path = Path(directory) / INDEX_FILE
    if not index_path.is_file():
        raise DataError(f"{index_path} not found; build shards first (tidar data build --out {directory})")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if np.dtype(index["dtype"]) not in (np.uint16, np.uint32):
            raise ValueError(f"dtype {index['dtype']}")
        for split in SPLITS:
            int(index[split]["tokens"])
        int(index["vocab_size"])
        int(index["eos_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index_path} is corrupt ({e}); rebuild the shards") from None
    return index


class TokenShards:
    """A built shard directory; ``split("train"|"val")`` gives its tokens as a read-only memmap."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir)
        self.index: dict[str, Any] = read_index(self.path)
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_id = int(self.index["eos_id"])
        for split in SPLITS:
            path = self.path / f"{split}.bin"
            size = path.stat().st_size if path.is_file() else -1
            want = self.index[split]["tokens"] * self.dtype.itemsize
            if size != want:
                raise DataError(f"{path} has {size} bytes but index.json says {want}; rebuild the shards")

    def tokens(self, name: str) -> int:
        """Number of tokens in a split."""
        return int(self.index[self._check(name)]["tokens"])

    def _check(self, name: str) -> str:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use 'train' or 'val'")
        return name

    def split(self, name: str) -> np.ndarray:
        """Read-only memmap of a split (an empty read-only array when the split has no tokens)."""
        if self.tokens(name) == 0:  # mmap cannot map an empty file
            arr = np.zeros(0, dtype=self.dtype)
            arr.flags.writeable = False
            return arr
        return np.memmap(self.path / f"{name}.bin", dtype=self.dtype, mode="r")

    def __repr__(self) -> str:
        return f"TokenShards({str(self.path)!r}, train={self.tokens('train')}, val={self.tokens('val')})"


def _check_tokens(tokens: np.ndarray, seq_len: int) -> int:
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.ndim != 1:
        raise DataError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    n = int(tokens.shape[0])
    if n < seq_len + 1:
        raise DataError(f"split has {n} tokens, fewer than seq_len+1 = {seq_len + 1}; use more data or shorter seq_len")
    return n


def batch_at(
    tokens: np.ndarray,
    step: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Training batch ``step`` for ``rank``: LongTensor (batch_size, seq_len) of random windows.

    Pure function of its arguments: the global batch of batch_size*world_size window starts comes from
    ``default_rng((seed, step))`` and each rank takes its own slice, so ranks never share a window and
    resuming at ``step`` reproduces the run exactly.
    """
    n = _check_tokens(tokens, seq_len)
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
    if step < 0 or seed < 0:
        raise DataError(f"step and seed must be >= 0, got step={step} seed={seed}")
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, n - seq_len + 1, size=batch_size * world_size)
    starts = starts[rank * batch_size : (rank + 1) * batch_size]
    idx = starts[:, None] + np.arange(seq_len)[None, :]
    return torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))


def val_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Deterministic eval batches: contiguous non-overlapping windows, the last batch possibly smaller.

    With ``max_batches`` the windows taken are spread evenly over the split (not just its first files),
    so a short eval still sees every part of the validation set.
    """
    n = _check_tokens(tokens, seq_len)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    total = n // seq_len
    want = total if max_batches is None else min(total, max(0, max_batches) * batch_size)
    windows = (np.arange(want, dtype=np.int64) * total) // max(want, 1)
    offs = np.arange(seq_len)[None, :]
    for b in range(0, want, batch_size):
        idx = windows[b : b + batch_size, None] * seq_len + offs
        yield torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
