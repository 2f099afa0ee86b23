"""Building token shards: sources tokenized into `train.bin` / `val.bin` + `index.json` (the layout
`tidar.train.loader` describes and reads), written so that a crash never leaves a complete-looking
shard directory behind."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from tidar.train.corpora import DEFAULT_VAL_FRACTION, Source, open_source, val_indices
from tidar.train.errors import DataError
from tidar.train.loader import INDEX_FILE, SPLITS

__all__ = ["ShardWriter", "atomic_write_text", "build_shards", "shard_writers", "tokenizer_from_spec", "write_index"]

# Documents are tokenized in batches (a fast tokenizer parallelises a list); bound memory by chars too.
_BATCH_DOCS = 64
_BATCH_CHARS = 4_000_000

Job = tuple[int, int]  # (source index, document index)


class ShardWriter:
    """Appends documents (+eos) to a temp file; only ``commit`` makes it visible under its final name."""

    def __init__(self, path: Path, dtype: np.dtype, eos_id: int, cap: int | None) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.fh = self.tmp.open("wb")
        self.dtype, self.eos, self.cap = dtype, eos_id, cap
        self.limit = np.iinfo(dtype).max
        self.tokens = 0
        self.files: list[str] = []

    @property
    def full(self) -> bool:
        return self.cap is not None and self.tokens >= self.cap

    def write(self, names: list[str], docs: list[list[int]]) -> None:
        parts = []
        for name, ids in zip(names, docs, strict=True):
            if self.full:
                break
            arr = np.empty(len(ids) + 1, dtype=np.int64)
            arr[:-1] = ids
            arr[-1] = self.eos
            if len(ids) and (arr.min() < 0 or arr.max() > self.limit):
                raise DataError(f"token id out of range for {self.dtype} in {name}; vocab_size is wrong")
            if self.cap is not None:
                arr = arr[: self.cap - self.tokens]
            parts.append(arr.astype(self.dtype))
            self.tokens += len(arr)
            self.files.append(name)
        if parts:
            self.fh.write(np.concatenate(parts).tobytes())

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def shard_writers(out: Path, dtype: np.dtype, eos_id: int, train_cap: int | None = None
                  ) -> Iterator[dict[str, ShardWriter]]:
    """One writer per split; all are committed when the block ends normally, all discarded otherwise."""
    writers = {name: ShardWriter(out / f"{name}.bin", dtype, eos_id, train_cap if name == "train" else None)
               for name in SPLITS}
    try:
        yield writers
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.discard()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_index(out: Path, writers: dict[str, ShardWriter], dtype: np.dtype, **fields: Any) -> dict[str, Any]:
    """Write `out/index.json` (atomically) for committed shard writers; `fields` describe the data."""
    index: dict[str, Any] = {"format": 1, "dtype": dtype.name, **fields}
    for split in SPLITS:
        index[split] = {"tokens": writers[split].tokens, "files": writers[split].files}
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return index


def _vocab_size(tokenizer: Any) -> int:
    try:
        return int(len(tokenizer))
    except TypeError:
        return int(tokenizer.vocab_size)


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if callable(tokenizer):
        try:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        except (TypeError, KeyError):
            ids = None
        if ids is not None and len(ids) == len(texts) and all(not isinstance(x, int) for x in ids):
            return ids
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _check_build_args(sources: Sequence[str], val_fraction: float, seed: int, max_tokens: int | None) -> None:
    if not sources:
        raise DataError("no sources given; pass e.g. stdlib,python-doc,bible")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be >= 1, got {max_tokens}")


def _token_format(tokenizer: Any, eos_id: int | None) -> tuple[int, int, np.dtype]:
    """(eos_id, vocab_size, shard dtype): uint16 while the vocabulary fits it."""
    eos_id = getattr(tokenizer, "eos_token_id", None) if eos_id is None else eos_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token_id; pass eos_id explicitly")
    vocab_size = _vocab_size(tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size < 65535 else np.uint32)
    if not 0 <= eos_id <= np.iinfo(dtype).max:
        raise DataError(f"eos_id {eos_id} does not fit the shard dtype {dtype} (vocab_size {vocab_size})")
    return int(eos_id), vocab_size, dtype


def _split_jobs(resolved: list[Source], val_fraction: float, seed: int) -> dict[str, list[Job]]:
    """The documents of each split; train in a seeded shuffled order, so a token cap keeps a mix of sources."""
    val_jobs: list[Job] = []
    train_jobs: list[Job] = []
    for si, src in enumerate(resolved):
        val = val_indices(src, val_fraction, seed)
        val_jobs.extend((si, i) for i in val)
        held = set(val)
        train_jobs.extend((si, i) for i in range(len(src.items)) if i not in held)
    train_jobs = [train_jobs[i] for i in np.random.default_rng((seed, 1)).permutation(len(train_jobs))]
    return {"val": val_jobs, "train": train_jobs}


@dataclass
class _Tally:
    """Per source, the documents tried and read; per reason, the documents skipped."""

    tried: list[int]
    ok: list[int]
    skipped: dict[str, int] = field(default_factory=lambda: {"unreadable": 0, "undecodable": 0, "empty": 0})


def _tokenize_split(split: str, jobs: list[Job], resolved: list[Source], tokenizer: Any,
                    writers: dict[str, ShardWriter], tally: _Tally, bar: tqdm) -> None:
    writer = writers[split]
    names: list[str] = []
    texts: list[str] = []
    chars = 0
    for si, i in jobs:
        src = resolved[si]
        tally.tried[si] += 1
        text, why = src.document(i)
        bar.update(1)
        if text is None:
            tally.skipped[why] += 1
            continue
        tally.ok[si] += 1
        names.append(src.names[i])
        texts.append(text)
        chars += len(text)
        if len(texts) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            writer.write(names, _encode_batch(tokenizer, texts))
            names, texts, chars = [], [], 0
            bar.set_postfix(train=writers["train"].tokens, val=writers["val"].tokens)
            if writer.full:
                break
    if texts:
        writer.write(names, _encode_batch(tokenizer, texts))


def _check_produced(resolved: list[Source], tally: _Tally, train: ShardWriter) -> None:
    for si, src in enumerate(resolved):
        if tally.tried[si] == len(src.items) and tally.ok[si] == 0:
            raise DataError(f"source {src.spec!r}: none of its {len(src.items)} files could be read as text")
    if train.tokens == 0:
        raise DataError("no training tokens were produced; add sources or lower val_fraction")


def build_shards(
    sources: Sequence[str] | str,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    max_tokens: int | None = None,
    eos_id: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` into ``out_dir/{train,val}.bin`` + ``index.json``; returns the index dict.

    Validation takes ``val_fraction`` of each source's files (at least one when it has >= 2).  Train
    documents are written in a seeded shuffled order so that ``max_tokens`` (a cap on train tokens)
    keeps a mix of all sources.  Output is byte-identical for identical inputs and seed.
    """
    if isinstance(sources, str):
        sources = [s for s in sources.split(",") if s.strip()]
    _check_build_args(sources, val_fraction, seed, max_tokens)
    eos_id, vocab_size, dtype = _token_format(tokenizer, eos_id)
    resolved = [open_source(s) for s in dict.fromkeys(sources)]  # resolve all first: fail before any work
    jobs = _split_jobs(resolved, val_fraction, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The index is what marks a shard directory complete: drop the old one before touching the bins.
    (out / INDEX_FILE).unlink(missing_ok=True)
    tally = _Tally([0] * len(resolved), [0] * len(resolved))
    with shard_writers(out, dtype, eos_id, max_tokens) as writers:
        with tqdm(total=len(jobs["val"]) + len(jobs["train"]), desc="tokenizing", unit="file",
                  disable=not progress) as bar:
            for split in ("val", "train"):
                _tokenize_split(split, jobs[split], resolved, tokenizer, writers, tally, bar)
        _check_produced(resolved, tally, writers["train"])
    return write_index(
        out, writers, dtype, vocab_size=vocab_size, eos_id=eos_id, seed=seed, val_fraction=val_fraction,
        max_tokens=max_tokens, sources=list(dict.fromkeys(sources)),
        tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__), skipped=tally.skipped)


def tokenizer_from_spec(name: str) -> Any:
    """A tokenizer for `build_shards`: 'default' (the shipped model's), a tokenizer directory or
    Hugging Face name, or a .gguf file."""
    from transformers import AutoTokenizer

    from tidar.model.weights import load_tokenizer

    if name == "default":
        return load_tokenizer()
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.exists():
        raise DataError(f"tokenizer path {name!r} does not exist; pass 'default', a tokenizer dir or a .gguf file")
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load tokenizer {name!r} ({first}); pass a local tokenizer dir or .gguf") from None
