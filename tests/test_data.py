"""Shard building, split policy and the deterministic batch loader (tiny fake tokenizer, no real model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tidar.cli.data import main as data_main
from tidar.train import corpora
from tidar.train.corpora import resolve_source
from tidar.train.errors import DataError
from tidar.train.loader import TokenShards, batch_at, val_batches
from tidar.train.selfgen import GENERATED_LOG, code_prompts, generate_shards
from tidar.train.shards import build_shards


class ByteTokenizer:
    """One id per UTF-8 byte, shifted by 1 so that id 0 is free for eos; handles lists like a fast tokenizer."""

    eos_token_id = 0
    name_or_path = "bytes"

    def __len__(self) -> int:
        return 257

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens: bool = False):
        texts = [text] if isinstance(text, str) else text
        ids = [self.encode(t) for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def decode(self, ids) -> str:  # noqa: ANN001
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


class EncodeOnlyTokenizer:
    """No __call__, a huge vocab: exercises the .encode fallback and the uint32 path."""

    eos_token_id = 70000
    vocab_size = 70001

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [69000 + b for b in text.encode("utf-8")]


def _decode(ids: np.ndarray) -> list[str]:
    """Split a byte-token stream at eos back into documents."""
    out, cur = [], []
    for t in ids.tolist():
        if t == 0:
            out.append(bytes(cur).decode("utf-8"))
            cur = []
        else:
            cur.append(t - 1)
    assert not cur
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "pkg" / "tests").mkdir(parents=True)
    for i in range(20):
        (root / "pkg" / f"mod{i:02d}.py").write_text(f"def f{i}():\n    return {i}\n")
    (root / "pkg" / "tests" / "test_a.py").write_text("assert True\n")
    (root / "notes.md").write_text("# notes\n")
    (root / "blob.bin.txt").write_bytes(b"\xff\xfe\x00garbage")  # text suffix, binary content
    (root / "image.png").write_bytes(b"\x89PNG")  # not a text suffix: never listed
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("cached = 1\n")
    return root


def test_build_roundtrip_and_index(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    idx = build_shards([str(corpus)], ByteTokenizer(), out, val_fraction=0.1, seed=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train.bin", "val.bin"]  # no temp files left
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk == idx
    assert idx["dtype"] == "uint16" and idx["eos_id"] == 0 and idx["vocab_size"] == 257
    assert idx["skipped"]["undecodable"] == 1
    sh = TokenShards(out)
    train, val = sh.split("train"), sh.split("val")
    assert isinstance(train, np.memmap) and not train.flags.writeable
    assert len(train) == idx["train"]["tokens"] and len(val) == idx["val"]["tokens"]
    # 23 text-suffix files, one undecodable: 10% -> 2 val files, the rest in train, none in both
    assert len(idx["val"]["files"]) + len(idx["train"]["files"]) == 22 and len(idx["val"]["files"]) in (1, 2)
    assert not set(idx["val"]["files"]) & set(idx["train"]["files"])
    assert not any("__pycache__" in f or "png" in f for f in idx["train"]["files"] + idx["val"]["files"])
    # every document round-trips, in the recorded file order
    docs = _decode(np.asarray(val))
    for name, doc in zip(idx["val"]["files"], docs, strict=True):
        assert (corpus / name.split(":", 1)[1]).read_text() == doc


def test_build_is_deterministic_and_seed_dependent(corpus: Path, tmp_path: Path) -> None:
    a = build_shards([str(corpus)], ByteTokenizer(), tmp_path / "a", val_fraction=0.2, seed=1, progress=False)
    b = build_shards([str(corpus)], ByteTokenizer(), tmp_path / "b", val_fraction=0.2, seed=1, progress=False)
    c = build_shards([str(corpus)], ByteTokenizer(), tmp_path / "c", val_fraction=0.2, seed=2, progress=False)
    for f in ("train.bin", "val.bin", "index.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert a["val"]["files"] == b["val"]["files"] != c["val"]["files"]


def test_val_split_by_file_never_stdlib_tests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    for d in ("test", "tests", "pkg/test", "idlelib/idle_test"):
        (lib / d).mkdir(parents=True)
        for i in range(5):
            (lib / d / f"case{i}.py").write_text(f"x = {i}\n")
    for i in range(5):
        (lib / f"test_mod{i}.py").write_text("t = 1\n")
        (lib / f"mod{i}.py").write_text("m = 1\n")
    (lib / "site-packages").mkdir()
    (lib / "site-packages" / "foreign.py").write_text("f = 1\n")
    monkeypatch.setattr(corpora.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    assert len(resolve_source("stdlib")) == 30
    val_sets = set()
    for seed in range(12):
        # 0.5 of 30 files wants 15 val files but only the 5 non-test modules are eligible
        idx = build_shards(
            ["stdlib"], ByteTokenizer(), tmp_path / f"s{seed}", val_fraction=0.5, seed=seed, progress=False
        )
        val = idx["val"]["files"]
        assert val and all(f.startswith("stdlib:mod") for f in val)
        assert len(idx["train"]["files"]) == 30 - len(val)
        val_sets.add(frozenset(val))
        idx = build_shards(
            ["stdlib"], ByteTokenizer(), tmp_path / f"t{seed}", val_fraction=0.05, seed=seed, progress=False
        )
        assert len(idx["val"]["files"]) == 2 and all(f.startswith("stdlib:mod") for f in idx["val"]["files"])
    assert len(val_sets) == 1  # all 5 eligible were taken each time
    assert next(iter(val_sets)) == {f"stdlib:mod{i}.py" for i in range(5)}


def test_min_one_val_file_and_max_tokens(tmp_path: Path) -> None:
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.txt").write_text("a" * 50)
    (d / "b.txt").write_text("b" * 50)
    idx = build_shards([str(d)], ByteTokenizer(), tmp_path / "o", val_fraction=0.001, progress=False)
    assert len(idx["val"]["files"]) == 1 and len(idx["train"]["files"]) == 1
    assert idx["train"]["tokens"] == 51 and idx["val"]["tokens"] == 51
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} " * 10}) + "\n" for i in range(40)) + "\n")
    idx = build_shards([str(rows)], ByteTokenizer(), tmp_path / "j", val_fraction=0.1, max_tokens=200, progress=False)
    assert idx["train"]["tokens"] == 200 and len(idx["val"]["files"]) == 4
    assert len(TokenShards(tmp_path / "j").split("train")) == 200


def test_uint32_and_encode_fallback(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    idx = build_shards([str(d)], EncodeOnlyTokenizer(), tmp_path / "o", progress=False)
    assert idx["dtype"] == "uint32" and idx["val"]["tokens"] == 0
    tr = TokenShards(tmp_path / "o").split("train")
    assert tr.dtype == np.uint32 and tr.tolist() == [69000 + b for b in b"hello"] + [70000]
    assert len(TokenShards(tmp_path / "o").split("val")) == 0


def test_crash_leaves_no_complete_shard(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    build_shards([str(corpus)], ByteTokenizer(), out, progress=False)

    class Boom(ByteTokenizer):
        def __call__(self, text, add_special_tokens=False):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_shards([str(corpus)], Boom(), out, progress=False)
    assert not (out / "index.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    with pytest.raises(DataError, match="build shards first"):
        TokenShards(out)


def test_token_shards_errors(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    build_shards([str(corpus)], ByteTokenizer(), out, progress=False)
    sh = TokenShards(out)
    with pytest.raises(DataError, match="unknown split"):
        sh.split("test")
    (out / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        TokenShards(out)
    idx = build_shards([str(corpus)], ByteTokenizer(), out, progress=False)
    idx["train"]["tokens"] += 1
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DataError, match="rebuild"):
        TokenShards(out)


def test_source_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no documents"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="unknown source"):
        resolve_source("wikipedia")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        resolve_source(str(bad))
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r":2: .*\"text\" field"):
        resolve_source(str(bad))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="could be read"):
        build_shards([str(tmp_path / "bin")], ByteTokenizer(), tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="val_fraction"):
        build_shards([str(bad)], ByteTokenizer(), tmp_path / "o", val_fraction=1.5, progress=False)


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert data_main(["build", "--sources", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown source 'nope'") and "Traceback" not in err
    assert data_main(["info", str(tmp_path)]) == 2
    # fails before any model is loaded
    assert data_main(["generate", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "g"), "--samples", "1"]) == 2
    assert "build shards first" in capsys.readouterr().err
    assert data_main(["generate", "--shards", str(tmp_path), "--out", str(tmp_path / "g"), "--samples", "1",
                      "--skip-prompts", "3"]) == 2
    assert "--skip-prompts applies to --prompts code only" in capsys.readouterr().err
    assert data_main(["generate", "--shards", str(tmp_path), "--out", str(tmp_path / "g"), "--samples", "1",
                      "--code-source", str(tmp_path)]) == 2
    assert "--code-source applies to --prompts code only" in capsys.readouterr().err
    assert data_main(["generate", "--prompts", "code", "--shards", str(tmp_path), "--out", str(tmp_path / "g"),
                      "--samples", "1", "--code-source", f"stdlib,{tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_batch_at_deterministic_and_ddp_disjoint() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)  # token == position: windows are easy to check
    b = batch_at(tokens, step=7, batch_size=4, seq_len=16, seed=5)
    assert b.dtype == torch.long and b.shape == (4, 16)
    assert torch.equal(b, batch_at(tokens, step=7, batch_size=4, seq_len=16, seed=5))
    assert (b[:, 1:] - b[:, :-1] == 1).all()  # contiguous windows
    assert not torch.equal(b, batch_at(tokens, step=8, batch_size=4, seq_len=16, seed=5))
    assert not torch.equal(b, batch_at(tokens, step=7, batch_size=4, seq_len=16, seed=6))
    world = 3
    ranks = [batch_at(tokens, 7, 4, 16, 5, rank=r, world_size=world) for r in range(world)]
    glob = batch_at(tokens, 7, 4 * world, 16, 5)
    assert torch.equal(torch.cat(ranks), glob)
    starts = [set(r[:, 0].tolist()) for r in ranks]
    assert all(not (starts[i] & starts[j]) for i in range(world) for j in range(i + 1, world))
    # the last window may end exactly at the end of the split
    small = np.arange(17, dtype=np.uint16)
    assert batch_at(small, 0, 64, 16, 0)[:, 0].max() <= 1
    with pytest.raises(DataError, match="seq_len"):
        batch_at(np.arange(16, dtype=np.uint16), 0, 1, 16, 0)
    with pytest.raises(DataError):
        batch_at(tokens, 0, 1, 16, 0, rank=3, world_size=3)


def test_val_batches() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    all_b = list(val_batches(tokens, seq_len=10, batch_size=8))
    assert [b.shape[0] for b in all_b] == [8] * 12 + [4]  # 100 windows
    flat = torch.cat(all_b).flatten()
    assert torch.equal(flat, torch.arange(1000))  # contiguous, non-overlapping, complete
    few = list(val_batches(tokens, seq_len=10, batch_size=4, max_batches=2))
    assert len(few) == 2 and all(b.shape == (4, 10) for b in few)
    starts = torch.cat(few)[:, 0].tolist()
    assert starts == sorted(set(starts)) and starts[-1] >= 800  # spread over the split
    assert [b.tolist() for b in few] == [b.tolist() for b in val_batches(tokens, 10, 4, 2)]
    with pytest.raises(DataError):
        list(val_batches(np.zeros(5, dtype=np.uint16), 10, 2))


def test_split_survives_moving_the_corpus(corpus: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / corpus.name
    moved.parent.mkdir()
    corpus.rename(moved)
    a = build_shards([str(moved)], ByteTokenizer(), tmp_path / "a", val_fraction=0.2, progress=False)
    moved.rename(corpus)
    b = build_shards([str(corpus)], ByteTokenizer(), tmp_path / "b", val_fraction=0.2, progress=False)
    assert [f.split(":")[1] for f in a["val"]["files"]] == [f.split(":")[1] for f in b["val"]["files"]]
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


@pytest.mark.skipif(not corpora.PYTHON_DOC_DIR.is_dir(), reason="python3.11-doc not installed")
def test_python_doc_source() -> None:
    items = resolve_source("python-doc")
    assert len(items) > 100 and all(isinstance(p, Path) for p in items)


@pytest.mark.skipif(not corpora.BIBLE_DATA.exists() or corpora.shutil.which("bible") is None, reason="bible-kjv missing")
def test_bible_source() -> None:
    books = resolve_source("bible")
    assert len(books) == 66
    assert books[0][0] == "bible:01 Genesis" and "1 In the beginning God created" in books[0][1]
    assert books[-1][0] == "bible:66 Revelation"


def test_held_out_documents_by_names_and_by_split(tmp_path):
    from tidar.train.corpora import held_out_documents

    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n")
    by_split = held_out_documents([str(tmp_path)], val_fraction=0.34, seed=0)
    assert len(by_split) == 2 and all(text.startswith("document number") for _, text in by_split)
    names = [name for name, _ in by_split]
    assert {n for n, _ in held_out_documents([str(tmp_path)], names=names)} == set(names)
    assert held_out_documents(["/no/such/source"]) == []


def _generated(src: Path, out: Path, samples: int, seed: int = 0):
    from conftest import tiny_model

    model = tiny_model(seed=1, vocab_size=257)
    return model, generate_shards(model, ByteTokenizer(), src, out, samples=samples, prompt_tokens=12,
                                       new_tokens=5, batch_size=3, val_every=3, seed=seed, progress=False)


def test_generate_shards_are_greedy_continuations_and_resume(corpus: Path, tmp_path: Path) -> None:
    from tidar.decode import GenerationConfig, generate

    build_shards([str(corpus)], ByteTokenizer(), tmp_path / "src", val_fraction=0.1, seed=0, progress=False)
    train = np.asarray(TokenShards(tmp_path / "src").split("train"), dtype=np.int64)
    model, idx = _generated(tmp_path / "src", tmp_path / "gen", samples=4)
    assert idx is not None and idx["generated"]["samples"] == 4
    # a resumed run with a torn last line equals a fresh run of the full size
    with (tmp_path / "gen" / GENERATED_LOG).open("a") as fh:
        fh.write('{"i": 4, "seed": 0, "pro')
    _, idx7 = _generated(tmp_path / "src", tmp_path / "gen", samples=7)
    _, fresh = _generated(tmp_path / "src", tmp_path / "fresh", samples=7)
    for split in ("train", "val"):
        assert (tmp_path / "gen" / f"{split}.bin").read_bytes() == (tmp_path / "fresh" / f"{split}.bin").read_bytes()
    assert idx7["val"]["files"] == ["generated:2", "generated:5"] and idx7["train"]["tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / GENERATED_LOG).read_text().splitlines()]
    assert [r["i"] for r in rows] == list(range(7))
    gen = GenerationConfig(mode="ar", max_new_tokens=5, eos_token_id=[0])
    text = train.tobytes()
    for r in rows:
        assert 0 < len(r["prompt"]) <= 12 and 0 not in r["prompt"]
        assert np.asarray(r["prompt"], dtype=np.int64).tobytes() in text  # a window of the train split
        want = generate(model, [r["prompt"]], gen).sequences[0]
        assert r["completion"] == [t for t in want if t != 0]
    shards = TokenShards(tmp_path / "gen")
    docs = np.split(np.asarray(shards.split("val")), np.flatnonzero(np.asarray(shards.split("val")) == 0) + 1)
    assert docs[0][:-1].tolist() == rows[2]["prompt"] + rows[2]["completion"]


def test_generate_shards_refuses_other_settings(corpus: Path, tmp_path: Path) -> None:
    build_shards([str(corpus)], ByteTokenizer(), tmp_path / "src", val_fraction=0.1, seed=0, progress=False)
    _generated(tmp_path / "src", tmp_path / "gen", samples=2)
    with pytest.raises(DataError, match="other settings"):
        _generated(tmp_path / "src", tmp_path / "gen", samples=3, seed=1)
    with pytest.raises(DataError, match="samples >= 1"):
        _generated(tmp_path / "src", tmp_path / "gen2", samples=0)


_CODE = '''import os


def add(a, b=1):
    """Add two numbers.

    More words.
    """
    c = a + b
    return c


def only_doc():
    """A docstring and nothing else."""


def no_doc(x):
    return x


class K:
    @staticmethod
    def twice(x):
        """Double x."""
        return 2 * x
'''


class ChatByteTokenizer(ByteTokenizer):
    chat_template = "fake"

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = True):  # noqa: ANN001
        return self.encode("<user>" + messages[0]["content"] + "<assistant>")


def test_code_prompts_end_after_the_docstring_and_skip_excluded_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(_CODE)
    (tmp_path / "held.py").write_text(_CODE.replace("add", "held_add"))
    (tmp_path / "notes.txt").write_text('def f():\n    """doc"""\n    return 1\n')
    tok = ByteTokenizer()
    got = code_prompts(tok, str(tmp_path), exclude=[f"{tmp_path}:held.py"], chat_every=0)
    texts = sorted(tok.decode(ids) for _, ids in got)
    assert texts == [
        '@staticmethod\ndef twice(x):\n    """Double x."""\n',
        'def add(a, b=1):\n    """Add two numbers.\n\n    More words.\n    """\n',
    ]
    assert {name for name, _ in got} == {f"{tmp_path}:a.py:4", f"{tmp_path}:a.py:23"}
    assert code_prompts(tok, str(tmp_path), chat_every=0, seed=3) == code_prompts(
        tok, str(tmp_path), chat_every=0, seed=3)
    assert len(code_prompts(tok, str(tmp_path), exclude=[f"{tmp_path}:held.py"], chat_every=0, max_tokens=50)) == 1
    # a chat template turns every chat_every-th prompt into a request for that function
    chat = code_prompts(ChatByteTokenizer(), str(tmp_path), exclude=[f"{tmp_path}:held.py"], chat_every=2)
    asks = [tok.decode(ids) for name, ids in chat if name.startswith("chat:")]
    assert len(asks) == 1 and asks[0] in ("<user>Write a Python function `add(a, b=1)`: Add two numbers.<assistant>",
                                          "<user>Write a Python function `twice(x)`: Double x.<assistant>")
    with pytest.raises(DataError, match="no Python functions"):
        code_prompts(tok, str(tmp_path / "notes.txt"))
    # skip leaves out the head of the seeded order, which an earlier run with that seed continued
    both = code_prompts(tok, str(tmp_path), chat_every=0, seed=5)
    assert code_prompts(tok, str(tmp_path), chat_every=0, seed=5, skip=2) == both[2:]
    with pytest.raises(DataError, match="cannot skip 4 prompts: there are 4"):
        code_prompts(tok, str(tmp_path), chat_every=0, skip=4)
    with pytest.raises(DataError, match="fits in 5 tokens"):
        code_prompts(tok, str(tmp_path), chat_every=0, max_tokens=5)


def test_generate_shards_from_given_prompts(corpus: Path, tmp_path: Path) -> None:
    from conftest import tiny_model

    from tidar.decode import GenerationConfig, generate

    build_shards([str(corpus)], ByteTokenizer(), tmp_path / "src", val_fraction=0.1, seed=0, progress=False)
    prompts = [(f"p{i}", ByteTokenizer().encode(f"def f{i}(x):\n")) for i in range(4)]
    model = tiny_model(seed=1, vocab_size=257)
    kw = dict(new_tokens=5, batch_size=3, val_every=2, progress=False, prompts=prompts, prompts_name="defs")
    idx = generate_shards(model, ByteTokenizer(), tmp_path / "src", tmp_path / "gen", samples=4, **kw)
    assert idx["val"]["files"] == ["generated:p1", "generated:p3"] and "defs (4 prompts, crc32 " in idx["sources"][0]
    rows = [json.loads(line) for line in (tmp_path / "gen" / GENERATED_LOG).read_text().splitlines()]
    gen = GenerationConfig(mode="ar", max_new_tokens=5, eos_token_id=[0])
    for r, (_, p) in zip(rows, prompts, strict=True):
        assert r["prompt"] == p and r["completion"] == [t for t in generate(model, [p], gen).sequences[0] if t != 0]
    with pytest.raises(DataError, match="only 4 prompts"):
        generate_shards(model, ByteTokenizer(), tmp_path / "src", tmp_path / "gen2", samples=5, **kw)
    with pytest.raises(DataError, match="other settings"):
        generate_shards(model, ByteTokenizer(), tmp_path / "src", tmp_path / "gen", samples=4,
                             **{**kw, "prompts": prompts[:3] + prompts[:1]})


def test_code_prompts_chat_asks_with_the_docstring_whatever_its_quotes(tmp_path: Path) -> None:
    (tmp_path / "q.py").write_text('def ixor(a, b):\n    "Same as a ^= b."\n    a ^= b\n    return a\n')
    tok = ChatByteTokenizer()
    (_, ids), = code_prompts(tok, str(tmp_path), chat_every=1)
    assert tok.decode(ids) == "<user>Write a Python function `ixor(a, b)`: Same as a ^= b.<assistant>"


def test_code_prompts_from_several_sources_leave_test_modules_out(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two / "pkg" / "tests", two / "pkg"):
        d.mkdir(parents=True, exist_ok=True)
    (one / "a.py").write_text(_CODE)
    (two / "pkg" / "b.py").write_text(_CODE.replace("add", "plus"))
    for name in ("tests/c.py", "test_d.py", "e_test.py", "conftest.py"):  # test modules: never prompts
        (two / "pkg" / name).write_text(_CODE.replace("add", "tested"))
    tok = ByteTokenizer()
    got = code_prompts(tok, [str(one), str(two)], chat_every=0)
    texts = [tok.decode(ids) for _, ids in got]
    assert len(got) == 4 and sum("def add(" in t for t in texts) == 1 and sum("def plus(" in t for t in texts) == 1
    assert not any("tested" in t for t in texts)
    assert sorted(got) == sorted(code_prompts(tok, str(one), chat_every=0) + code_prompts(tok, str(two), chat_every=0))
