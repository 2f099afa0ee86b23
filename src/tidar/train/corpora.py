"""Text corpora: the named sources (stdlib, python-doc, bible), directories, .jsonl files and single
text files, read as documents, and the held-out (validation) split of each source.

The validation split is taken by *file* (never by line) so that near-duplicate lines of one file can
not leak between train and val."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sysconfig
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tidar.train.errors import DataError

__all__ = [
    "BIBLE_DATA",
    "DEFAULT_VAL_FRACTION",
    "NAMED_SOURCES",
    "PYTHON_DOC_DIR",
    "Source",
    "held_out_documents",
    "open_source",
    "read_text",
    "resolve_source",
    "val_indices",
]

NAMED_SOURCES = ("stdlib", "python-doc", "bible")
PYTHON_DOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
BIBLE_DATA = Path("/usr/lib/bible.data")
DEFAULT_VAL_FRACTION = 0.02
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

Item = Path | tuple[str, str]


@dataclass
class Source:
    """The documents of one source spec: file paths, or (name, text) pairs for sources that are not
    files, sorted by their stable names (`spec:relative/path`)."""

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
        """Whether document i may be held out (stdlib test modules may not)."""
        if self.kind != "stdlib":
            return True
        rel = Path(self.names[i].split(":", 1)[1])
        return not (rel.name.startswith("test_") or _STDLIB_TEST_DIRS.intersection(rel.parts[:-1]))

    def document(self, i: int) -> tuple[str | None, str]:
        """(text, "") of document i, or (None, why) with why 'unreadable', 'undecodable' or 'empty'."""
        item = self.items[i]
        if isinstance(item, tuple):
            return (item[1], "") if item[1].strip() else (None, "empty")
        return read_text(item)


def _is_text_name(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower() in TEXT_SUFFIXES or name in TEXT_NAMES


def _walk(root: Path, keep: Callable[[str], bool]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath, f) for f in sorted(filenames) if keep(f))
    return out


def _bible_text() -> str:
    """The KJV text from Debian's bible-kjv, one verse a line."""
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
            [exe, "-l100000", "Genesis1:1-Revelation22:21"], capture_output=True, text=True, timeout=120, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"source 'bible': running {exe} failed ({e}); reinstall bible-kjv") from None
    return proc.stdout


def _bible_books() -> list[tuple[str, str]]:
    """One pseudo-file per book (66), so the val split is by book."""
    header = re.compile(r"^((?:[1-3] )?[A-Z][A-Za-z ]*?) (\d+)$")
    books: dict[str, list[str]] = {}
    book = None
    for line in _bible_text().splitlines():
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


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise DataError(f'{path}:{lineno}: expected a JSON object with a string "text" field; fix the line')
    return text


def _jsonl_docs(path: Path, spec: str) -> list[tuple[str, str]]:
    try:
        with path.open(encoding="utf-8") as fh:
            return [(f"{spec}:{lineno}", _jsonl_text(path, lineno, line)) for lineno, line in enumerate(fh, 1)
                    if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} ({e}); check the file is readable UTF-8 JSON lines") from None


def _named_source(spec: str) -> Source:
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return Source(spec, "stdlib", root, _walk(root, lambda f: f.endswith(".py")))
    if spec == "python-doc":
        if not PYTHON_DOC_DIR.is_dir():
            raise DataError(f"source 'python-doc' needs {PYTHON_DOC_DIR} (apt-get install python3.11-doc)")
        return Source(spec, "python-doc", PYTHON_DOC_DIR,
                      _walk(PYTHON_DOC_DIR, lambda f: f.endswith((".txt", ".rst", ".gz"))))
    return Source(spec, "bible", None, list(_bible_books()))


def _path_source(spec: str) -> Source:
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, "dir", path, _walk(path, lambda f: _is_text_name(Path(f))))
    if path.is_file() and path.suffix == ".jsonl":
        return Source(spec, "jsonl", None, list(_jsonl_docs(path, spec)))
    if path.is_file():
        if not _is_text_name(path):
            raise DataError(f"source {spec!r} is not a text file, a .jsonl file or a directory")
        return Source(spec, "file", path.parent, [path])
    if os.sep in spec or "/" in spec or spec.startswith((".", "~")) or path.suffix:
        raise DataError(f"source path {spec!r} does not exist; check the path")
    raise DataError(f"unknown source {spec!r}; use one of {', '.join(NAMED_SOURCES)}, a directory or a .jsonl file")


def open_source(spec: str) -> Source:
    """The Source of one spec (see `resolve_source`); raises DataError for a bad or empty one."""
    spec = spec.strip()
    src = _named_source(spec) if spec in NAMED_SOURCES else _path_source(spec)
    if not src.items:
        raise DataError(f"source {spec!r} has no documents (no text files / lines found); point it at text data")
    return src


def resolve_source(spec: str) -> list[Path | tuple[str, str]]:
    """Documents of one source spec: file paths, or (name, text) pairs for sources that are not files.

    Specs: ``stdlib``, ``python-doc``, ``bible``, a directory, a ``.jsonl`` file (one {"text": ...} per
    line) or a single text file.  Raises DataError for unknown specs, missing paths and empty sources.
    """
    return list(open_source(spec).items)


def read_text(path: Path) -> tuple[str | None, str]:
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


def val_indices(src: Source, val_fraction: float, seed: int) -> list[int]:
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


def held_out_documents(specs: Sequence[str], *, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                       names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(name, text) of the validation documents of these sources: the files `build_shards` holds out
    with this fraction and seed or, given `names` (a shard index's val files), exactly those.
    Sources not present on this machine and unreadable files are skipped."""
    wanted = set(names) if names is not None else None
    docs = []
    for spec in specs:
        try:
            src = open_source(spec)
        except DataError:
            continue
        if wanted is None:
            indices = val_indices(src, val_fraction, seed)
        else:
            indices = [i for i, name in enumerate(src.names) if name in wanted]
        for i in indices:
            text = src.document(i)[0]
            if text:
                docs.append((src.names[i], text))
    return docs
