"""`tidar bench`: the report schema, interleaving, divergence records, validation before loading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from tidar.cli.bench import main as bench_main
from tidar.measure import bench, prompts
from tidar.measure.bench import first_difference, method_order, normalize, run_bench
from tidar.measure.prompts import BenchError
from tidar.measure.runners import BenchOptions, EngineRunner, HFRunner, Run, build_runners
from tidar.runtime import Runtime

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # ids 0..95; 96 is EOS (tiny vocab: 97)


class CharTokenizer:
    """One token per character: enough tokenizer for the runtime, stop strings and decoding."""

    eos_token_id = 96
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [CHARS.index(c) if c in CHARS else CHARS.index("?") for c in text]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:  # noqa: ANN001
        return "".join(CHARS[i] for i in ids if i < len(CHARS))

    def __len__(self) -> int:
        return 97


def tiny_runtime(dtype: torch.dtype = torch.float32) -> Runtime:
    return Runtime(tiny_model(seed=3).to(dtype), CharTokenizer(), name="tiny")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: validation must come first."""
    def fail(*a, **k):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(Runtime, "load", classmethod(fail))
    monkeypatch.setattr("tidar.model.weights.load_model", fail)
    monkeypatch.setattr(bench, "build_runners", fail)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOP_KEYS = {"model", "dtype", "threads", "prompts", "source", "max_new_tokens", "date", "torch", "machine", "methods"}
METHOD_KEYS = {"tokens_per_s", "tokens_per_forward", "speedup_vs_ar", "matches_ar", "mean_acceptance",
               "acceptance_histogram", "generated_tokens", "forwards", "divergences"}


def test_json_schema_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, name=None, dtype="bfloat16", compile=None, weights=None: tiny_runtime()))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def f(x):"}, {"prompt": "hello world"},
                                                 {"prompt": "abc abc abc", "chat": False}])
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"dtype": "float32", "threads": 2, "prefix": 256,
                                   "latency_s": {"1": 0.01, "4": 0.012, "20": 0.02, "64": 0.05},
                                   "choice": {"best": {"block_size": 2, "policy": "full", "tokens": 4}}}))
    out = tmp_path / "bench.json"
    rc = bench_main(["--prompts", str(prompts), "--methods", "ar,tidar", "--max-new-tokens", "12", "--dtype",
                     "float32", "--json", str(out), "--no-progress", "--plots", str(tmp_path / "plots"),
                     "--profile", str(profile)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert TOP_KEYS <= set(report)
    assert report["prompts"] == 3 and report["max_new_tokens"] == 12 and report["dtype"] == "float32"
    assert set(report["methods"]) == {"ar", "tidar"}
    for entry in report["methods"].values():
        assert METHOD_KEYS <= set(entry)
        assert entry["tokens_per_s"] > 0 and entry["speedup_vs_ar"] is not None
        assert entry["generated_tokens"] > 0 and entry["forwards"] > 0
    ti, ar = report["methods"]["tidar"], report["methods"]["ar"]
    assert ti["matches_ar"] == 1.0 and ti["divergences"] == []
    assert ar["speedup_vs_ar"] == 1.0 and ar["tokens_per_forward"] == 1.0
    assert ti["generated_tokens"] == ar["generated_tokens"]
    assert len(ti["acceptance_histogram"]) == 4 and ti["mean_acceptance"] >= 1.0
    stdout = capsys.readouterr().out
    assert "tidar" in stdout and "matches_ar" in stdout
    for name in ("tokens_per_s.png", "tokens_per_forward.png", "acceptance.png", "latency.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 0


def fake_runner(name, calls, tokens=(1, 2, 3)):
    def run(ids, n, stop=()):
        calls.append((name, tuple(ids), n))
        return Run(list(tokens)[:n], 0.01, forwards=max(len(tokens) - 1, 0), decode_tokens=max(len(tokens) - 1, 0))
    return run


def test_methods_interleaved_per_prompt_with_rotation():
    calls = []
    methods = ["ar", "tidar", "hf"]
    runners = {m: fake_runner(m, calls) for m in methods}
    prompts = [[5], [6, 7], [8]]
    rt = SimpleNamespace(eos_ids=[96], model=None)
    res = run_bench(rt, prompts, methods, 8, runners=runners, warmup=1)
    warm, timed = calls[:3], calls[3:]
    assert sorted(c[0] for c in warm) == sorted(methods) and all(c[1] == (5,) for c in warm)
    assert len(timed) == 9
    for p, ids in enumerate(prompts):
        block = timed[3 * p: 3 * p + 3]
        assert [c[0] for c in block] == method_order(methods, p)  # all methods on prompt p, then the next prompt
        assert {c[1] for c in block} == {tuple(ids)} and all(c[2] == 8 for c in block)
    assert [c[0] for c in timed[:3]] != [c[0] for c in timed[3:6]]  # rotated
    assert res.methods["hf"]["matches_ar"] == 1.0 and res.methods["hf"]["speedup_vs_ar"] == 1.0


def test_divergence_records_position_and_ar_margin():
    rt = tiny_runtime()
    calls = []
    runners = {"ar": fake_runner("ar", calls, (10, 11, 12, 13)), "other": fake_runner("other", calls, (10, 11, 40, 13))}
    res = run_bench(rt, [[1, 2, 3], [4, 5]], ["ar", "other"], 4, runners=runners, warmup=0)
    other = res.methods["other"]
    assert other["matches_ar"] == 0.0
    assert [d["prompt_index"] for d in other["divergences"]] == [0, 1]
    d = other["divergences"][0]
    assert d["first_diff_index"] == 2
    assert d["ar_top2_margin"] == pytest.approx(bench.ar_top2_margin(rt.model, [1, 2, 3], [10, 11]))
    assert d["ar_top2_margin"] >= 0


def test_comparison_up_to_eos_and_max_tokens():
    eos = [96]
    assert normalize([5, 96, 7, 8], eos, 10) == [5, 96]
    assert normalize([1, 2, 3, 4], eos, 3) == [1, 2, 3]
    assert first_difference(normalize([5, 96], eos, 4), normalize([5, 96, 3], eos, 4)) is None
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one stopped early without EOS: differs at its end
    assert first_difference([1, 9, 3], [1, 2, 3]) == 1


@pytest.mark.parametrize("make_args, fragment", [
    (lambda d: ["--prompts", str(d / "ok.jsonl"), "--methods", "ar,bogus"], "unknown method 'bogus'"),
    (lambda d: ["--prompts", str(d / "missing.jsonl")], "does not exist"),
    (lambda d: ["--prompts", str(d / "bad.jsonl")], "bad.jsonl:2:"),
    (lambda d: ["--prompts", str(d / "ok.jsonl"), "--limit", "0"], "must be >= 1"),
    (lambda d: ["--prompts", str(d / "ok.jsonl"), "--max-new-tokens", "0"], "must be >= 1"),
    (lambda d: ["--prompts", str(d / "ok.jsonl"), "--methods", "ar,spec"], "spec"),
])
def test_validation_errors_exit_2_before_loading(tmp_path, no_model_load, capsys, make_args, fragment, monkeypatch):
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "x"}])
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, {"text": "no prompt here"}])
    assert bench_main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and fragment in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_llamacpp_fails_clearly(tmp_path, no_model_load, capsys, monkeypatch):
    write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "x"}])
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert bench_main(["--prompts", str(tmp_path / "ok.jsonl"), "--methods", "llamacpp"]) == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


def test_hf_methods_match_our_ar(tmp_path):
    pytest.importorskip("transformers")
    from tidar.model.weights import save_pretrained

    rt = tiny_runtime()
    save_pretrained(rt.model, tmp_path / "tiny")
    base = HFRunner.load(tmp_path / "tiny", "float32", rt.tokenizer, rt.eos_ids)
    runners = {"ar": EngineRunner(rt, {"mode": "ar"}), "hf": base,
               "hf-lookup": HFRunner(base.model, rt.tokenizer, rt.eos_ids, lookup=10)}
    prompts = [rt.encode("abcabcabc abcabc"), rt.encode("hello")]
    res = run_bench(rt, prompts, list(runners), 16, runners=runners, warmup=0)
    for m in ("hf", "hf-lookup"):
        assert res.methods[m]["matches_ar"] == 1.0, res.methods[m]["divergences"]
        assert res.methods[m]["forwards"] > 0
    assert res.methods["hf"]["tokens_per_forward"] == pytest.approx(1.0)


def test_prose_passages_skip_markup():
    doc = ("Title\n=====\n\n.. note::\n   directive body\n\n    indented code block line one two three\n\n"
           + " ".join(["word"] * 100) + "\n\nshort para\n\n1 In the beginning " + " ".join(["verse"] * 50))
    got = prompts._passages(doc)
    assert len(got) == 2
    assert got[0].split() == ["word"] * 80
    assert got[1].startswith("In the beginning") and len(got[1].split()) == 53


def test_plot_demo(tmp_path):
    from tidar.measure.plots import plot_demo

    stats = {"tokens_per_s": 10.0, "tokens_per_forward": 1.0}
    rows = [{"prompt": "code", "matches_ar": True, "tidar": {"tokens_per_s": 15.0, "tokens_per_forward": 2.1},
             "ar": stats, "speedup_vs_ar": 1.5},
            {"prompt": "prose", "matches_ar": False, "tidar": {"tokens_per_s": 9.0, "tokens_per_forward": 1.4},
             "ar": stats, "speedup_vs_ar": 0.9}]
    png = plot_demo(rows, tmp_path / "demo.png")
    assert png.stat().st_size > 0


def test_cpu_monitor_reports_a_share_or_none():
    share = bench.CpuMonitor().start().stop()
    assert share is None or 0.0 <= share <= 1.0


def test_baseline_methods_through_the_harness():
    pytest.importorskip("tidar.measure.baselines")
    rt = tiny_runtime()
    methods = ["ar", "tidar", "diffusion", "spec"]
    runners = build_runners(rt, methods, BenchOptions(dtype="float32", draft_layers=1, engine={"lookup_ngram": 2}))
    res = run_bench(rt, [rt.encode("abcabcabc abc"), rt.encode("hello")], methods, 12, runners=runners, warmup=0)
    assert res.methods["spec"]["matches_ar"] == 1.0  # speculative decoding is lossless
    assert res.methods["tidar"]["matches_ar"] == 1.0  # with prompt-lookup drafts merged, too
    assert res.methods["diffusion"]["generated_tokens"] > 0 and res.methods["diffusion"]["forwards"] > 0
    for m in methods:
        assert res.methods[m]["tokens_per_forward"] is not None


def test_learning_method_drafts_from_earlier_prompts_outputs_only():
    """`tidar-learn`: a fork of the model's datastore learns each output (not the warm-up's), so a
    prompt asked again drafts its earlier answer; the model's own datastore learns nothing."""
    from tidar.decode import Datastore

    rt = tiny_runtime()
    rt.model.datastore = Datastore([[1, 2, 3]], vocab_size=97)
    rt.operating_point = {"block_size": 3, "datastore_tokens": 8}
    p = [rt.encode("the cat sat on"), rt.encode("a dog ran to")]
    prompts = [p[0], p[1], p[0]]
    methods = ["ar", "tidar", "tidar-learn"]
    runners = build_runners(rt, methods, BenchOptions(dtype="float32"))
    res = run_bench(rt, prompts, methods, 24, runners=runners, warmup=1)
    assert res.methods["tidar-learn"]["matches_ar"] == res.methods["tidar"]["matches_ar"] == 1.0
    learned = [r.accepted_drafts["datastore"] for r in res.runs["tidar-learn"]]
    plain = [r.accepted_drafts["datastore"] for r in res.runs["tidar"]]
    assert learned[0] == plain[0]  # nothing learned before the first prompt: the warm-up is forgotten
    assert learned[2] > plain[2] + 10  # the repeated prompt copies its earlier answer
    assert rt.datastore.learned_tokens == 0
    with pytest.raises(BenchError, match="needs a model with a datastore"):
        build_runners(tiny_runtime(), ["tidar-learn"], BenchOptions(dtype="float32"))


def test_runtime_compile_falls_back_to_eager_when_inductor_fails(monkeypatch):
    import io

    rt = tiny_runtime()

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(rt.model, "compile_blocks", lambda: setattr(rt.model, "_compiled_block", broken) or rt.model)
    log = io.StringIO()
    assert rt.compile(log=log) is False
    assert not rt.compiled
    assert "InvalidCxxCompiler" in log.getvalue() and "running eager" in log.getvalue()
    assert rt.generate_text("abc", rt.generation_config(max_new_tokens=3)).tokens


def test_demo_step_cost_note_states_the_break_even_point():
    from tidar.demo import step_cost_note

    note = step_cost_note({"forward_s": 3.0, "forwards": 100}, {"forward_s": 1.5, "forwards": 100})
    assert "30.0 ms vs 15.0 ms" in note and "above 2.00 tokens/forward" in note
