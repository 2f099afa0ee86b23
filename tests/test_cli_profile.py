"""`tidar profile`: every flag changes what is timed, calibrated or written, on a tiny random model."""

from __future__ import annotations

import json

import pytest
from test_bench import tiny_runtime

from tidar.cli.profile import main
from tidar.runtime import Runtime


@pytest.fixture
def profiled(monkeypatch):
    """Runs `tidar profile` on a tiny model: records the Runtime.load arguments, the threads set,
    every forward as (new tokens, cache offset) and every calibration generation's config."""
    calls: dict = {"forwards": [], "gens": []}

    def load(cls, name=None, dtype="bfloat16", compile=None, weights=None):
        calls["load"] = (name, dtype, compile)
        rt = tiny_runtime()
        real = rt.model.forward

        def spy(ids, *args, **kwargs):
            calls["forwards"].append((ids.shape[1], kwargs.get("offset")))
            return real(ids, *args, **kwargs)

        rt.model.forward = spy
        generate_text = rt.generate_text
        rt.generate_text = lambda prompt, gen, **kw: calls["gens"].append(gen) or generate_text(prompt, gen, **kw)
        return rt

    monkeypatch.setattr(Runtime, "load", classmethod(load))
    monkeypatch.setattr("torch.set_num_threads", lambda n: calls.__setitem__("threads", n))
    return calls


def run(tmp_path, *args: str) -> dict:
    path = tmp_path / "sub" / "profile.json"
    assert main(["--prefix", "8", "--repeats", "1", *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_tokens_are_the_forward_lengths_timed(profiled, tmp_path, capsys):
    out = run(tmp_path, "--tokens", "4,1,2,2")
    assert list(out["latency_s"]) == list(out["latency_plain_s"]) == ["1", "2", "4"]
    assert {n for n, offset in profiled["forwards"] if offset == 8} == {1, 2, 4}
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.split()[0].isdigit()]
    assert rows == ["1", "2", "4"]


@pytest.mark.parametrize("prefix, repeats", [(8, 1), (20, 3)])
def test_prefix_is_the_cache_length_and_repeats_the_timed_rounds(profiled, tmp_path, prefix, repeats):
    out = run(tmp_path, "--tokens", "1,3", "--prefix", str(prefix), "--repeats", str(repeats))
    fills = [f for f in profiled["forwards"] if f[1] == 0]
    steps = [f for f in profiled["forwards"] if f[1] != 0]
    assert fills == [(prefix, 0)] and out["prefix"] == prefix
    assert {offset for _, offset in steps} == {prefix}  # every timed forward runs after the prefix
    # 2 lengths x (with, without [MASK] rows), one warm-up round plus `repeats` timed ones
    assert len(steps) == 2 * 2 * (repeats + 1)


def test_json_is_written_where_asked_and_only_then(profiled, tmp_path, monkeypatch, capsys):
    out = run(tmp_path, "--tokens", "1")
    assert {"dtype", "threads", "prefix", "latency_s", "latency_plain_s"} <= out.keys() and "choice" not in out
    assert f"wrote {tmp_path / 'sub' / 'profile.json'}" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["--tokens", "1", "--prefix", "8", "--repeats", "1"]) == 0
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["profile.json"]


def test_model_dtype_compile_and_threads(profiled, tmp_path):
    out = run(tmp_path, "--tokens", "1", "--model", "some/dir", "--dtype", "fp32", "--no-compile", "--threads", "3")
    assert profiled["load"] == ("some/dir", "float32", False) and profiled["threads"] == 3
    assert out["dtype"] == "float32"
    run(tmp_path, "--tokens", "1", "--compile")
    assert profiled["load"] == (None, "bfloat16", True)
    assert profiled["gens"] == []  # without --choose nothing is calibrated


def test_choose_calibrates_the_given_block_sizes(profiled, tmp_path, capsys):
    out = run(tmp_path, "--tokens", "1,8,16", "--choose", "--choose-block-sizes", "2,3")
    candidates = out["choice"]["candidates"]
    assert sorted((c["block_size"], c["policy"]) for c in candidates) == [(2, "all"), (2, "full"), (3, "all"), (3, "full")]
    assert all(c["lookup_ngram"] == 0 and c["lookup_tokens"] == 0 for c in candidates)
    assert {(g.block_size, g.policy, g.lookup_ngram) for g in profiled["gens"]} == \
        {(2, "all", 0), (2, "full", 0), (3, "all", 0), (3, "full", 0)}
    best = out["choice"]["best"]
    assert best == max(candidates, key=lambda c: c["expected_tokens_per_s"])
    assert f"chosen operating point: block_size={best['block_size']} policy={best['policy']}" in capsys.readouterr().out


def test_lookup_ngram_and_lookup_tokens_are_calibrated(profiled, tmp_path):
    out = run(tmp_path, "--tokens", "1,8,16", "--choose", "--choose-block-sizes", "2", "--lookup-ngram", "2",
              "--choose-lookup-tokens", "0,4")
    got = sorted((c["policy"], c["lookup_tokens"]) for c in out["choice"]["candidates"])
    assert got == [("all", 0), ("all", 4), ("full", 0), ("full", 4)]
    assert all(c["lookup_ngram"] == 2 for c in out["choice"]["candidates"])
    assert {(g.lookup_ngram, g.lookup_tokens) for g in profiled["gens"]} == {(2, 0), (2, 4)}


@pytest.mark.parametrize("args, fragment", [
    (["--tokens", "0,4"], "must be >= 1"),
    (["--tokens", "4,x"], "expected comma-separated integers"),
    (["--tokens", ","], "expected comma-separated integers"),
    (["--prefix", "0"], "must be >= 1"),
    (["--repeats", "0"], "must be >= 1"),
    (["--choose-block-sizes", "2,0"], "must be >= 1"),
    (["--lookup-ngram", "-1"], "must be >= 0"),
    (["--choose-lookup-tokens", "-4"], "must be >= 0"),
])
def test_bad_flags_are_one_line_errors_before_loading(profiled, capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tidar profile:") and fragment in err and len(err.splitlines()) == 1
    assert "load" not in profiled

