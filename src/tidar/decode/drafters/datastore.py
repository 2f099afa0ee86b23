"""Drafts from a datastore of the model's own greedy outputs, where prompt lookup finds nothing.

A small model's greedy continuations of code are repetitive *across* prompts, not only within one:
the same model, asked for a different function, tends to write the same idioms the same way. So
when the context's last n tokens also occur in text this model generated earlier (`tidar data
generate`), what followed them there is a good guess at what it will write now (REST, He et al.
2023, retrieves from a corpus; SuffixDecoding, Oliaro et al. 2024, from a model's previous
outputs). Drafts never change the output: the engine verifies them like any other.

The index is an n-gram table per order: for every distinct n-gram in the stored text, where the
continuation starts that follows its most frequent next token. A lookup tries the longest order
first (`draft`), so one step costs a few binary searches.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from tidar.decode.drafters import Draft, DraftContext, Drafter

DATASTORE_FILE = "datastore.safetensors"
ORDERS = (4, 3, 2)
# learned tokens kept in memory (a Python n-gram index: about 540 bytes per token of HumanEval
# answers over three orders, measured with tracemalloc, so ~110 MB at the limit); past
# this the learned part starts again from empty, so a long-running server stays bounded
LEARN_LIMIT = 200_000


class DatastoreError(ValueError):
    """A datastore that cannot be built or loaded."""


class Datastore:
    """N-gram index over token sequences; `draft(context, limit)` proposes what followed there."""

    def __init__(self, sequences: Iterable[Sequence[int]], vocab_size: int, orders: Sequence[int] = ORDERS,
                 meta: dict | None = None) -> None:
        if not orders or min(orders) < 1:
            raise DatastoreError(f"orders must be positive n-gram lengths, got {list(orders)}")
        self.vocab_size = vocab_size
        self.orders = tuple(sorted(set(orders), reverse=True))
        self.meta = dict(meta or {})
        # one flat array; a separator (vocab_size, never a real token) ends each sequence, so no key
        # spans two sequences and no draft runs from one into the next
        sep = vocab_size
        parts = []
        for s in sequences:
            arr = np.asarray(s, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise DatastoreError(f"token ids must lie in [0, {vocab_size}), got {arr.min()}..{arr.max()}")
            parts.append(arr)
            parts.append(np.array([sep], dtype=np.int64))
        self.tokens = np.concatenate(parts) if parts else np.array([sep], dtype=np.int64)
        self.sequences = len(parts) // 2
        self._base = vocab_size + 1
        self._tables = {n: self._table(n) for n in self.orders}
        self.reset_learned()

    # -- learning from served outputs (SuffixDecoding-style): a small overlay the tables don't hold
    def reset_learned(self) -> None:
        """Forget every sequence `learn` added."""
        self._learned: list[int] = []  # added sequences, each ended by the separator
        self._learned_index: dict[tuple[int, ...], dict[int, list[int]]] = {}  # n-gram -> next -> [count, start]
        self.learned_sequences = 0

    def learn(self, sequence: Sequence[int]) -> None:
        """Add one sequence (an output the model just wrote); later drafts prefer what the learned
        sequences hold: recent outputs are the likeliest to be repeated (same user, same task).
        Past LEARN_LIMIT learned tokens, the learned part is forgotten first."""
        seq = [int(t) for t in sequence]
        if any(not 0 <= t < self.vocab_size for t in seq):
            raise DatastoreError(f"token ids must lie in [0, {self.vocab_size}), got {min(seq)}..{max(seq)}")
        if self.learned_tokens + len(seq) > LEARN_LIMIT:
            self.reset_learned()
        offset = len(self._learned)
        self._learned.extend(seq)
        self._learned.append(self.vocab_size)
        self.learned_sequences += 1
        for n in self.orders:
            for i in range(n, len(seq)):
                succ = self._learned_index.setdefault(tuple(seq[i - n: i]), {})
                entry = succ.get(seq[i])
                if entry is None:
                    succ[seq[i]] = [1, offset + i]
                else:
                    entry[0] += 1

    @property
    def learned_tokens(self) -> int:
        return len(self._learned) - self.learned_sequences

    def fork(self) -> Datastore:
        """A datastore sharing these tables (read-only) whose learning stays its own."""
        other = copy.copy(self)
        other.reset_learned()
        return other

    def _keys(self, n: int) -> np.ndarray:
        """Each n-gram as one int64: its digits in base vocab_size + 1, exact while that fits (n <= 4
        for a 49K vocabulary), else wrapped modulo 2**64, a hash whose rare collision can only
        cost a rejected draft, never a wrong token."""
        t = self.tokens
        keys = np.zeros(len(t) - n, dtype=np.int64)
        with np.errstate(over="ignore"):
            for i in range(n):
                keys = keys * self._base + t[i: len(t) - n + i]
        return keys

    def _key(self, ngram: Sequence[int]) -> int:
        """`_keys` for one n-gram, in Python integers (-1 if a token is outside the vocabulary)."""
        key = 0
        for v in ngram:
            if not 0 <= v < self.vocab_size:
                return -1
            key = (key * self._base + v) & 0xFFFF_FFFF_FFFF_FFFF
        return key - (1 << 64) if key >= 1 << 63 else key

    def _table(self, n: int) -> tuple[np.ndarray, ...]:
        """Every (n-gram, next token) pair seen: sorted by key, then by count (descending), then by
        token id; for each, where the continuation after the pair's earliest occurrence starts and
        the pair's share of the key's occurrences. A key's first row is its draft."""
        t, sep = self.tokens, self.vocab_size
        if len(t) <= n:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        keys = self._keys(n)
        pos = np.arange(len(keys))
        nxt = t[n:]
        ok = nxt != sep  # a key must be followed by a real token (and so contains no separator)
        for i in range(n):
            ok &= t[i: len(t) - n + i] != sep
        keys, pos, nxt = keys[ok], pos[ok], nxt[ok]
        if not len(keys):
            return keys, pos.astype(np.int32), np.zeros(0, dtype=np.float32)
        order = np.lexsort((pos, nxt, keys))
        keys, pos, nxt = keys[order], pos[order], nxt[order]
        # runs of equal (key, next): their length is that next token's count for the key
        new_pair = np.ones(len(keys), dtype=bool)
        new_pair[1:] = (keys[1:] != keys[:-1]) | (nxt[1:] != nxt[:-1])
        pair_start = np.flatnonzero(new_pair)
        pair_count = np.diff(np.append(pair_start, len(keys)))
        pair_key = keys[pair_start]
        by = np.lexsort((-pair_count, pair_key))  # key ascending, count descending, stable (token id)
        pair_key, pair_count, pair_start = pair_key[by], pair_count[by], pair_start[by]
        first = np.ones(len(by), dtype=bool)
        first[1:] = pair_key[1:] != pair_key[:-1]
        key_total = np.add.reduceat(pair_count, np.flatnonzero(first))
        share = pair_count / np.repeat(key_total, np.diff(np.append(np.flatnonzero(first), len(by))))
        # int32 / float32: the tables of a few million tokens stay tens of MB
        return pair_key, (pos[pair_start] + n).astype(np.int32), share.astype(np.float32)

    def draft(self, context: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest of the context's last n-grams found."""
        if limit <= 0:
            return []
        hit = self._lookup(context)
        if hit is None:
            return []
        src, start = hit
        return self._continuation(src, start, limit)

    def _continuation(self, src: Sequence[int], start: int, limit: int) -> list[int]:
        """Up to `limit` tokens of `src` (the tables' array, or the learned list) from `start`, cut
        at the end of their sequence."""
        cont = src[start: start + limit]
        cont = cont.tolist() if isinstance(cont, np.ndarray) else cont
        return cont[: cont.index(self.vocab_size)] if self.vocab_size in cont else cont

    def _row(self, context: Sequence[int], n: int) -> int | None:
        """The first row of the order-n table for the context's last n-gram, or None if absent."""
        if len(context) < n:
            return None
        key = self._key(context[-n:])
        if key == -1 and any(not 0 <= v < self.vocab_size for v in context[-n:]):
            return None
        keys = self._tables[n][0]
        i = int(np.searchsorted(keys, key))
        return i if i < len(keys) and keys[i] == key else None

    def _rows(self, context: Sequence[int], n: int) -> range:
        """All rows of the order-n table for the context's last n-gram (one per next token seen,
        most frequent first); empty if absent."""
        i = self._row(context, n)
        if i is None:
            return range(0)
        keys = self._tables[n][0]
        return range(i, int(np.searchsorted(keys, keys[i], side="right")))

    def _lookup(self, context: Sequence[int]) -> tuple[Sequence[int], int] | None:
        """(token array, continuation start in it) for the longest n-gram found, learned sequences
        first; or None."""
        if self._learned_index:
            for n in self.orders:
                succ = self._learned_index.get(tuple(context[-n:])) if len(context) >= n else None
                if succ:
                    _, (_, start) = min(succ.items(), key=lambda kv: (-kv[1][0], kv[0]))
                    return self._learned, start
        for n in self.orders:
            i = self._row(context, n)
            if i is not None:
                return self.tokens, int(self._tables[n][1][i])
        return None

    def successors(self, context: Sequence[int], k: int) -> list[tuple[int, float]]:
        """The k most frequent next tokens after the longest of the context's last n-grams found in
        the tables (learned sequences aside), with their shares of its occurrences (empty when
        none is found)."""
        for n in self.orders:
            rows = self._rows(context, n)[:k]
            if rows:
                _, starts, share = self._tables[n]
                return [(int(self.tokens[starts[r]]), float(share[r])) for r in rows]
        return []

    def drafts(self, context: Sequence[int], limit: int, k: int) -> list[list[int]]:
        """Up to k drafts of up to `limit` tokens, each starting with a different next token: the
        successors of the longest n-gram found in the tables (learned sequences aside), most
        frequent first, then those of shorter ones."""
        out: list[list[int]] = []
        if limit <= 0 or k <= 0:
            return out
        firsts: set[int] = set()
        for n in self.orders:
            starts = self._tables[n][1]
            for r in self._rows(context, n):
                cont = self._continuation(self.tokens, int(starts[r]), limit)
                if cont and cont[0] not in firsts:
                    firsts.add(cont[0])
                    out.append(cont)
                    if len(out) == k:
                        return out
        return out

    def __len__(self) -> int:
        return len(self.tokens) - self.sequences

    def save(self, directory: str | Path) -> Path:
        """Write `datastore.safetensors` (token ids as uint16 where they fit; the index is rebuilt on
        load, in about a second) atomically."""
        path = Path(directory) / DATASTORE_FILE
        dtype = np.uint16 if self.vocab_size < 2**16 else np.uint32
        meta = {"vocab_size": str(self.vocab_size), "orders": json.dumps(list(self.orders)),
                "meta": json.dumps(self.meta)}
        tmp = path.with_suffix(".tmp")
        flat = np.concatenate([self.tokens, np.asarray(self._learned, dtype=np.int64)])  # learned ones too
        save_file({"tokens": flat.astype(dtype)}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Datastore:
        path = Path(directory)
        path = path / DATASTORE_FILE if path.is_dir() else path
        if not path.exists():
            raise DatastoreError(f"no datastore at {path}; build one with `tidar datastore build`")
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        try:
            vocab_size = int(meta["vocab_size"])
            orders = json.loads(meta["orders"])
        except (KeyError, ValueError) as e:
            raise DatastoreError(f"{path} is not a tidar datastore (metadata: {sorted(meta)})") from e
        flat = load_file(str(path))["tokens"].astype(np.int64)
        cuts = np.flatnonzero(flat == vocab_size)
        seqs = np.split(flat, cuts)
        # np.split keeps each separator at the start of the next piece; the last piece is empty
        seqs = [s[1:] if i else s for i, s in enumerate(seqs)][: len(cuts)]
        return cls(seqs, vocab_size, orders, json.loads(meta.get("meta", "{}")))

    # -- the built object as files: building the n-gram tables took 1.7-2.0 s of a cold start
    def write_built(self, directory: Path) -> None:
        """Write this datastore's attributes into the existing `directory` (`read_built` reads them):
        arrays as .npy files, the rest as JSON, no pickle. TypeError for an attribute this format does
        not hold (then write nothing that is kept)."""
        skeleton = _encode(vars(self), directory, [0])
        (directory / BUILT_SKELETON).write_text(json.dumps(skeleton))

    @classmethod
    def read_built(cls, directory: Path) -> Datastore:
        """The datastore `write_built` wrote, its arrays mapped copy-on-write (pages are read as
        lookups touch them; `learn` never writes back). OSError, ValueError, KeyError or TypeError for
        a missing or damaged directory."""
        store = cls.__new__(cls)
        store.__dict__.update(_decode(json.loads((directory / BUILT_SKELETON).read_text()), directory))
        return store


BUILT_SKELETON = "datastore.json"  # `write_built`'s JSON; the arrays are numbered .npy files beside it


def _encode(value: Any, directory: Path, counter: list[int]) -> Any:
    """`value` as JSON, each non-empty array written to its own .npy in `directory`; TypeError for
    what the format does not hold."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError("object arrays are not written")
        if value.size == 0:  # numpy cannot map an empty file
            return {"empty": value.dtype.str, "shape": list(value.shape)}
        counter[0] += 1
        name = f"{counter[0]}.npy"
        np.save(directory / name, value, allow_pickle=False)
        return {"array": name}
    if value is None or type(value) in (bool, int, float, str):
        return {"value": value}
    if type(value) in (list, tuple):
        return {type(value).__name__: [_encode(v, directory, counter) for v in value]}
    if type(value) is dict:
        return {"dict": [[_encode(k, directory, counter), _encode(v, directory, counter)] for k, v in value.items()]}
    raise TypeError(f"{type(value).__name__} is not written")


def _decode(node: dict[str, Any], directory: Path) -> Any:
    if "array" in node:
        return np.load(directory / Path(node["array"]).name, mmap_mode="c", allow_pickle=False)
    if "empty" in node:
        return np.zeros(node["shape"], dtype=np.dtype(node["empty"]))
    if "value" in node:
        return node["value"]
    if "list" in node:
        return [_decode(v, directory) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, directory) for v in node["tuple"])
    return {_decode(k, directory): _decode(v, directory) for k, v in node["dict"]}


class DatastoreDrafter(Drafter):
    source = "datastore"

    def __init__(self, store: Datastore, max_tokens: int) -> None:
        self.store = store
        self.max_tokens = max_tokens

    def propose(self, key: int, ctx: DraftContext) -> Draft | None:
        tokens = self.store.draft(ctx.history, self.max_tokens)
        return Draft(tokens, self.source) if tokens else None
