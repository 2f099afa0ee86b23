"""Every flag of `tidar data build|generate|info` does what its help says (a byte-level tokenizer saved
to disk, a tiny random model, tiny corpora)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from tidar.cli.data import main as data_main
from tidar.decode import GenerationConfig, generate
from tidar.model import weights
from tidar.model.weights import load_model, save_pretrained
from tidar.train import corpora, selfgen
from tidar.train.loader import TokenShards
from tidar.train.selfgen import GENERATED_LOG, code_prompts
from tidar.train.shards import build_shards

EOS = 0


def byte_tokenizer():
    """A Hugging Face fast tokenizer with one id per byte (1..256) and <eos> = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={"<eos>": EOS, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(tiny_model(seed=1, vocab_size=257), tmp_path_factory.mktemp("model") / "m",
                           tokenizer=byte_tokenizer())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "texts"
    root.mkdir()
    for i in range(10):
        (root / f"doc{i}.txt").write_text(f"document {i}\n" + f"line {i} of some text\n" * 8)
    return root


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} " * 12}) + "\n" for i in range(6)))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    assert data_main(["build", "--sources", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer_dir),
                      "--val-fraction", "0.2", "--no-progress"]) == 0
    return out


def build(out: Path, sources: list[Path], tokenizer_dir: Path, *flags: str) -> dict:
    assert data_main(["build", "--sources", ",".join(map(str, sources)), "--out", str(out),
                      "--tokenizer", str(tokenizer_dir), *flags]) == 0
    return json.loads((out / "index.json").read_text())


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / GENERATED_LOG).read_text().splitlines()]


# -- build -----------------------------------------------------------------------------------------


def test_build_sources_out_and_tokenizer(tmp_path: Path, corpus: Path, rows: Path, tokenizer_dir: Path, capsys) -> None:
    idx = build(tmp_path / "o", [corpus, rows], tokenizer_dir, "--no-progress")
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'o'}: train ")
    assert idx["sources"] == [str(corpus), str(rows)] and idx["tokenizer"] == str(tokenizer_dir)
    files = idx["train"]["files"] + idx["val"]["files"]
    assert sum(f.startswith(f"{corpus}:") for f in files) == 10 and sum(f.startswith(f"{rows}:") for f in files) == 6
    # the same shards as the library builds with that tokenizer, byte for byte
    from transformers import AutoTokenizer

    build_shards([str(corpus), str(rows)], AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "lib", progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "o" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()


def test_build_val_fraction_and_seed(tmp_path: Path, corpus: Path, tokenizer_dir: Path) -> None:
    half = build(tmp_path / "half", [corpus], tokenizer_dir, "--val-fraction", "0.5", "--no-progress")
    assert len(half["val"]["files"]) == 5 and len(half["train"]["files"]) == 5 and half["val_fraction"] == 0.5
    one = build(tmp_path / "one", [corpus], tokenizer_dir, "--val-fraction", "0.3", "--seed", "1", "--no-progress")
    two = build(tmp_path / "two", [corpus], tokenizer_dir, "--val-fraction", "0.3", "--seed", "2", "--no-progress")
    again = build(tmp_path / "again", [corpus], tokenizer_dir, "--val-fraction", "0.3", "--seed", "1", "--no-progress")
    assert (one["seed"], two["seed"]) == (1, 2) and len(one["val"]["files"]) == 3
    assert one["val"]["files"] == again["val"]["files"] != two["val"]["files"]
    assert one["train"]["files"] == again["train"]["files"] != two["train"]["files"]  # the train order too


def test_build_max_tokens_and_eos_id(tmp_path: Path, corpus: Path, tokenizer_dir: Path) -> None:
    capped = build(tmp_path / "capped", [corpus], tokenizer_dir, "--max-tokens", "100", "--no-progress")
    assert capped["train"]["tokens"] == 100 and capped["max_tokens"] == 100
    assert len(TokenShards(tmp_path / "capped").split("train")) == 100
    # 256 is byte 0xAD's id: never in this ASCII text, so every occurrence is a separator
    idx = build(tmp_path / "eos", [corpus], tokenizer_dir, "--eos-id", "256", "--val-fraction", "0.2", "--no-progress")
    val = np.asarray(TokenShards(tmp_path / "eos").split("val"))
    assert idx["eos_id"] == 256 and val[-1] == 256 and (val == 256).sum() == len(idx["val"]["files"]) == 2
    assert (val == EOS).sum() == 0  # not the tokenizer's eos


def test_build_progress_bar_and_no_progress(tmp_path: Path, corpus: Path, tokenizer_dir: Path, capsys) -> None:
    build(tmp_path / "a", [corpus], tokenizer_dir)
    assert "tokenizing" in capsys.readouterr().err
    build(tmp_path / "b", [corpus], tokenizer_dir, "--no-progress")
    assert "tokenizing" not in capsys.readouterr().err


def test_build_tokenizer_default_and_gguf(tmp_path: Path, corpus: Path, tokenizer_dir: Path, monkeypatch, capsys) -> None:
    from transformers import AutoTokenizer

    asked = []
    monkeypatch.setattr(weights, "load_tokenizer", lambda *a: asked.append(a) or AutoTokenizer.from_pretrained(tokenizer_dir))
    assert data_main(["build", "--sources", str(corpus), "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert asked == [()]  # 'default': the shipped model's tokenizer
    gguf = tmp_path / "m" / "model.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")

    def fake_from_pretrained(name, **kw):  # noqa: ANN001, ANN202
        asked.append((name, kw))
        return byte_tokenizer()

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_from_pretrained)
    assert data_main(["build", "--sources", str(corpus), "--out", str(tmp_path / "g"), "--tokenizer", str(gguf),
                      "--no-progress"]) == 0
    assert asked[-1] == (str(gguf.parent), {"gguf_file": "model.Q4.gguf"})
    assert data_main(["build", "--sources", str(corpus), "--out", str(tmp_path / "x"),
                      "--tokenizer", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: tokenizer path '{tmp_path / 'missing'}' does not exist")


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--val-fraction", "1"], "must be in [0, 1)"),
    (["--val-fraction", "x"], "expected a number"),
    (["--max-tokens", "0"], "must be >= 1"),
    (["--seed", "-1"], "must be >= 0"),
    (["--eos-id", "-2"], "must be >= 0"),
])
def test_build_bad_values_are_one_line_errors(tmp_path: Path, corpus: Path, flags: list[str], fragment: str,
                                              capsys) -> None:
    assert data_main(["build", "--sources", str(corpus), "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_info(shards: Path, capsys) -> None:
    assert data_main(["info", str(shards)]) == 0
    out = capsys.readouterr().out.splitlines()
    idx = json.loads((shards / "index.json").read_text())
    assert out[0].startswith(f"{shards}: dtype=uint16 vocab=257 eos=0 tokenizer=") and out[0].endswith(f"sources={idx['sources'][0]}")
    assert out[1] == f"  train: {idx['train']['tokens']:,} tokens, {len(idx['train']['files'])} files"
    assert out[2] == f"  val: {idx['val']['tokens']:,} tokens, 2 files"


# -- generate --------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch) -> dict[str, list]:
    """What the engine was asked to generate: batch sizes and the model's dtype."""
    seen: dict[str, list] = {"batches": [], "dtypes": []}

    def spying(model, prompts, gen):  # noqa: ANN001, ANN202
        seen["batches"].append(len(prompts))
        seen["dtypes"].append(next(model.parameters()).dtype)
        return generate(model, prompts, gen)

    monkeypatch.setattr(selfgen, "generate", spying)
    return seen


def test_generate_corpus_prompts_with_every_generation_flag(tmp_path: Path, shards: Path, model_dir: Path, spy,
                                                            capsys) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "gen"
    try:
        assert data_main(["generate", "--shards", str(shards), "--out", str(out), "--samples", "4",
                          "--prompt-tokens", "12", "--new-tokens", "5", "--batch-size", "3", "--seed", "1",
                          "--model", str(model_dir), "--dtype", "float32", "--threads", "1", "--no-progress"]) == 0
        assert torch.get_num_threads() == 1  # --threads
    finally:
        torch.set_num_threads(threads)
    io = capsys.readouterr()
    assert io.out.startswith(f"wrote {out}: train ") and "generating" not in io.err  # --no-progress
    assert spy["batches"] == [3, 1] and set(spy["dtypes"]) == {torch.float32}  # --batch-size, --dtype
    idx = json.loads((out / "index.json").read_text())
    assert idx["generated"]["model"] == str(model_dir) and idx["generated"]["samples"] == 4  # --model, --samples
    assert "(5 tokens) of 12-token prompts" in idx["sources"][0]
    train = np.asarray(TokenShards(shards).split("train"), dtype=np.int64).tobytes()
    model = load_model(model_dir)
    gen = GenerationConfig(mode="ar", max_new_tokens=5, eos_token_id=[EOS])
    log = read_log(out)
    assert [r["i"] for r in log] == [0, 1, 2, 3] and {r["seed"] for r in log} == {1}  # --seed
    for r in log:
        assert 0 < len(r["prompt"]) <= 12 and np.asarray(r["prompt"], dtype=np.int64).tobytes() in train
        assert r["completion"] == [t for t in generate(model, [r["prompt"]], gen).sequences[0] if t != EOS]
    # another seed draws other prompts; the default dtype is bfloat16, and a bar shows without --no-progress
    assert data_main(["generate", "--shards", str(shards), "--out", str(tmp_path / "seed2"), "--samples", "4",
                      "--prompt-tokens", "12", "--new-tokens", "5", "--seed", "2", "--model", str(model_dir)]) == 0
    assert [r["prompt"] for r in read_log(tmp_path / "seed2")] != [r["prompt"] for r in log]
    assert spy["dtypes"][-1] == torch.bfloat16 and "generating" in capsys.readouterr().err


def test_generate_time_limit_stops_resumably(tmp_path: Path, shards: Path, model_dir: Path, capsys) -> None:
    argv = ["generate", "--shards", str(shards), "--out", str(tmp_path / "g"), "--samples", "2",
            "--prompt-tokens", "12", "--new-tokens", "3", "--model", str(model_dir), "--no-progress"]
    assert data_main([*argv, "--time-limit-min", "0"]) == 0
    assert capsys.readouterr().out.strip() == f"time limit reached; re-run the same command to continue {tmp_path / 'g'}"
    assert read_log(tmp_path / "g") == [] and not (tmp_path / "g" / "index.json").exists()
    assert data_main(argv) == 0
    assert len(read_log(tmp_path / "g")) == 2 and (tmp_path / "g" / "index.json").exists()


_CODE = '''def add{i}(a, b):
    """Add two numbers ({i})."""
    return a + b


def scale{i}(x):
    """Scale x by {i}."""
    return {i} * x
'''


def test_generate_code_prompts_code_source_and_skip_prompts(tmp_path: Path, tokenizer_dir: Path, model_dir: Path,
                                                            monkeypatch) -> None:
    code = tmp_path / "code"
    code.mkdir()
    for i in range(3):
        (code / f"m{i}.py").write_text(_CODE.format(i=i))
    idx = build(tmp_path / "s", [code], tokenizer_dir, "--val-fraction", "0.34", "--no-progress")
    (held,) = idx["val"]["files"]
    common = ["generate", "--shards", str(tmp_path / "s"), "--prompts", "code", "--new-tokens", "3",
              "--model", str(model_dir), "--no-progress"]
    assert data_main([*common, "--out", str(tmp_path / "g"), "--code-source", str(code), "--samples", "2",
                      "--skip-prompts", "1"]) == 0
    tok = byte_tokenizer()
    want = code_prompts(tok, str(code), exclude=[held], seed=0)
    assert len(want) == 4  # two functions in each train file; the held-out file gives none
    assert [r["prompt"] for r in read_log(tmp_path / "g")] == [ids for _, ids in want[1:3]]
    sources = json.loads((tmp_path / "g" / "index.json").read_text())["sources"][0]
    assert f"functions of {code} through their docstrings" in sources and "from #1 of seed 0's order" in sources
    # --code-source defaults to stdlib (here a small stand-in)
    monkeypatch.setattr(corpora.sysconfig, "get_paths", lambda: {"stdlib": str(code)})
    assert data_main([*common, "--out", str(tmp_path / "std"), "--samples", "1"]) == 0
    (row,) = read_log(tmp_path / "std")
    assert tok.decode(row["prompt"]).startswith("def ") and row["prompt"] in [ids for _, ids in code_prompts(tok, "stdlib")]
