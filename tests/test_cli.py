"""The command line: clear one-line errors and a non-zero exit code for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_bench import tiny_runtime

from tidar.cli import main
from tidar.runtime import Runtime


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tidar.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "must be >= 1"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-3"], "must be >= 1"),
    (["generate", "--prompt", "x", "--bogus"], "unrecognized arguments"),
    (["generate", "--prompt", "x", "--dtype", "int4"], "dtype must be"),
    (["nonsense"], "invalid choice"),
])
def test_argument_errors_are_one_line(args, fragment, capsys):
    try:
        code = main(args)
    except SystemExit as e:  # the top-level parser exits; a subcommand's returns its code
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_empty_prompt_and_missing_model():
    r = run("generate", "--prompt", "   ")
    assert r.returncode == 2 and r.stderr.strip() == "error: --prompt is empty: give the text to continue"
    r = run("generate", "--prompt", "hi", "--model", "/no/such/dir")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["serve"], ["profile"], ["demo"], ["generate", "--prompt", "x"]])
def test_a_missing_model_is_one_line(command, monkeypatch, capsys):
    from tidar.model.weights import WeightsError
    from tidar.runtime import Runtime

    def load(cls, *a, **k):
        raise WeightsError("model directory /no/such/dir does not exist")

    monkeypatch.setattr(Runtime, "load", classmethod(load))
    assert main([*command, "--model", "/no/such/dir"]) == 2
    assert capsys.readouterr().err.strip() == "error: model directory /no/such/dir does not exist"


@pytest.fixture
def compare_runtime(monkeypatch):
    """A tiny runtime whose operating point mixes in prompt lookup and gates the diffusion block, as
    the shipped one does; it records every generation's config and result."""
    rt = tiny_runtime()
    rt.operating_point = {"block_size": 3, "policy": "full", "lookup_ngram": 2, "min_draft_gain": 0.5}
    rt.calls = []
    generate = rt.generate_text

    def recorded(prompt, gen, **kw):
        rt.calls.append((gen, generate(prompt, gen, **kw)))
        return rt.calls[-1][1]

    monkeypatch.setattr(rt, "generate_text", recorded)
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: rt))
    return rt


def test_generate_compare_json_adds_ar_and_diffusion_only_stats(compare_runtime, capsys):
    args = ["generate", "--prompt", "abcabcabcabc", "--max-new-tokens", "12", "--json"]
    assert main([*args, "--compare", "--lookup-ngram", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    (run, ran), (ar_gen, ar), (di_gen, di) = compare_runtime.calls
    assert (run.mode, run.lookup_ngram, run.policy, run.min_draft_gain) == ("tidar", 3, "full", 0.5)
    assert ar_gen.mode == "ar" and (di_gen.mode, di_gen.lookup_ngram, di_gen.policy, di_gen.min_draft_gain) == (
        "tidar", 0, "all", 0.0)  # the preset wins over --lookup-ngram for the diffusion-only run
    assert {g.max_new_tokens for g, _ in compare_runtime.calls} == {12}
    assert got["tokens"] == ran.tokens and got["compare"] == {
        "ar": ar.stats, "diffusion_only": di.stats, "matches_ar": True, "diffusion_only_matches_ar": True}
    assert ar.stats["mode"] == "ar" and ar.stats["tokens_per_forward"] == 1.0 and ar.tokens == ran.tokens == di.tokens
    d = got["compare"]["diffusion_only"]
    assert d["accepted_drafts"]["lookup"] == 0 and d["accepted_drafts"]["datastore"] == 0
    assert d["plain_forwards"] == 0 and d["query_tokens"] == d["forwards"] * (3 + 3 * 3)  # a block every step
    assert main(args) == 0 and "compare" not in json.loads(capsys.readouterr().out)


def test_generate_compare_prints_a_summary_on_stderr(compare_runtime, capsys):
    assert main(["generate", "--prompt", "abcabcabcabc", "--max-new-tokens", "12", "--compare"]) == 0
    out, err = capsys.readouterr()
    (_, run), (_, ar), (_, di) = compare_runtime.calls
    assert out == run.text + "\n"
    lines = err.splitlines()
    assert len(lines) == 4 and lines[0].startswith("compare")

    def rate(r):  # noqa: ANN001, ANN202
        return f"{r.stats['tokens_per_forward']:.2f} tokens/forward, {r.stats['tokens_per_s']:.1f} tok/s"

    speedup = run.stats["tokens_per_s"] / ar.stats["tokens_per_s"]
    assert lines[1].split() == ["this", "run:", *rate(run).split(), f"({speedup:.2f}x", "AR),", "identical", "to",
                                "AR:", "True"]
    assert "diffusion drafts only:" in lines[2] and rate(di) in lines[2] and lines[2].endswith("identical to AR: True")
    assert lines[3].split() == ["AR:", *rate(ar).split()]


@pytest.mark.parametrize("flags, fragment", [
    (["--mode", "ar"], "drop --mode ar"),
    (["--diffusion-only"], "drop --diffusion-only"),
])
def test_generate_compare_excludes_ar_and_diffusion_only(flags, fragment, monkeypatch, capsys):
    def load(cls, *a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(Runtime, "load", classmethod(load))
    assert main(["generate", "--prompt", "x", "--compare", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compare already decodes with AR and with diffusion drafts only")
    assert fragment in err and len(err.splitlines()) == 1
