"""`tidar bench` and `tidar eval` flags do what their help says (tiny model, no real weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_model
from test_bench import CharTokenizer, tiny_runtime

from tidar.cli.bench import main as bench_main
from tidar.cli.eval import main as eval_main
from tidar.measure import evaluate, runners
from tidar.model.weights import save_pretrained
from tidar.runtime import Runtime


@pytest.fixture
def rt(monkeypatch):
    runtime = tiny_runtime()
    monkeypatch.setattr(Runtime, "load", classmethod(lambda cls, *a, **k: runtime))
    return runtime


def run_bench(tmp_path, *argv: str) -> dict:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "abc abc abc"}\n')
    out = tmp_path / "r.json"
    assert bench_main(["--prompts", str(prompts), "--max-new-tokens", "12", "--no-progress", "--json", str(out),
                       *argv]) == 0
    return json.loads(out.read_text())


def test_spec_draft_layers_and_gamma(rt, tmp_path):
    report = run_bench(tmp_path, "--methods", "ar,spec", "--draft-layers", "1", "--gamma", "2")
    spec = report["methods"]["spec"]
    assert report["config"]["draft_layers"] == 1 and report["config"]["gamma"] == 2
    assert len(spec["acceptance_histogram"]) == 3  # acceptance lengths 1..gamma + 1
    assert spec["matches_ar"] == 1.0  # speculative decoding is lossless


def test_spec_draft_model_is_loaded_from_its_directory(rt, tmp_path, monkeypatch):
    save_pretrained(tiny_model(seed=9), tmp_path / "draft")
    loaded = []
    real = runners.load_model
    monkeypatch.setattr(runners, "load_model", lambda path, **k: loaded.append(str(path)) or real(path, **k))
    report = run_bench(tmp_path, "--methods", "ar,spec", "--draft-model", str(tmp_path / "draft"), "--dtype", "float32")
    assert loaded == [str(tmp_path / "draft")] and report["config"]["draft_model"] == str(tmp_path / "draft")
    assert report["methods"]["spec"]["matches_ar"] == 1.0


def test_diffusion_thresholds_set_how_many_tokens_a_forward_unmasks(rt, tmp_path):
    one = run_bench(tmp_path, "--methods", "ar,diffusion", "--thresholds", "1.0", "--block-size", "3")
    assert one["methods"]["diffusion"]["tokens_per_forward"] == 1.0  # one token per forward
    both = run_bench(tmp_path, "--methods", "ar,diffusion", "--thresholds", "1.0,0.000001", "--block-size", "3")
    assert set(both["methods"]) == {"ar", "diffusion-t1", "diffusion-t1e-06"}
    assert both["methods"]["diffusion-t1"]["tokens_per_forward"] == 1.0
    assert both["methods"]["diffusion-t1e-06"]["tokens_per_forward"] > 2.0  # a whole block per forward, nearly
    assert bench_main(["--prompts", str(tmp_path / "p.jsonl"), "--thresholds", "0"]) == 2


def test_tidar_diffusion_sweeps_block_sizes_and_policies_without_copy_drafts(rt, tmp_path):
    report = run_bench(tmp_path, "--methods", "ar,tidar,tidar-diffusion", "--block-sizes", "2,3", "--policies",
                       "all,full", "--lookup-ngram", "2")
    runs = {"tidar-diffusion-b2-all": (2, "all"), "tidar-diffusion-b2-full": (2, "full"),
            "tidar-diffusion-b3-all": (3, "all"), "tidar-diffusion-b3-full": (3, "full")}
    assert set(report["methods"]) == {"ar", "tidar", *runs}
    for name, (b, policy) in runs.items():
        m = report["methods"][name]
        assert m["matches_ar"] == 1.0 and len(m["acceptance_histogram"]) == b
        blocks = b if policy == "all" else min(2, b)
        assert m["query_tokens_per_forward"] == b + b * blocks  # every step pre-drafts: no gate, no copies
        assert set(m["accepted_drafts"]) <= {"diffusion", "lookup", "datastore", "none"}
        assert m["accepted_drafts"]["lookup"] == 0 and m["accepted_drafts"]["datastore"] == 0
    assert bench_main(["--prompts", str(tmp_path / "p.jsonl"), "--block-sizes", "0"]) == 2
    assert bench_main(["--prompts", str(tmp_path / "p.jsonl"), "--policies", "topk"]) == 2


def test_tidar_diffusion_sweeps_beta_and_only_beta_one_is_lossless(rt, tmp_path):
    report = run_bench(tmp_path, "--methods", "ar,tidar-diffusion", "--block-sizes", "3", "--betas", "0,1")
    methods = report["methods"]
    assert set(methods) == {"ar", "tidar-diffusion-b3-beta0", "tidar-diffusion-b3-beta1"}
    assert report["config"]["betas"] == [0.0, 1.0]
    assert methods["tidar-diffusion-b3-beta1"]["matches_ar"] == 1.0
    zero = methods["tidar-diffusion-b3-beta0"]  # every diffusion draft kept: b tokens per forward
    assert zero["acceptance_histogram"][:2] == [0, 0] and zero["tokens_per_forward"] > 2.0
    assert bench_main(["--prompts", str(tmp_path / "p.jsonl"), "--betas", "1.5"]) == 2


def test_warmup_is_the_number_of_untimed_generations_per_method(rt, tmp_path, monkeypatch):
    calls = []
    real = runners.EngineRunner.__call__
    monkeypatch.setattr(runners.EngineRunner, "__call__", lambda self, *a, **k: calls.append(a[1]) or real(self, *a, **k))
    run_bench(tmp_path, "--methods", "tidar", "--warmup", "2")
    assert len(calls) == 2 + 2  # two warm-ups, then the two prompts
    calls.clear()
    report = run_bench(tmp_path, "--methods", "tidar", "--warmup", "0")
    assert len(calls) == 2 and report["config"]["warmup"] == 0


def test_bench_limit_takes_the_first_prompts(rt, tmp_path):
    report = run_bench(tmp_path, "--methods", "ar", "--limit", "1")
    assert report["prompts"] == 1


PROBLEMS = [{"task_id": f"t/{i}", "prompt": f"def f{i}(x):\n", "test": "def check(c):\n    pass\n",
             "entry_point": f"f{i}"} for i in range(3)]


def test_eval_humaneval_limit_timeout_exec_and_tokens(rt, tmp_path, monkeypatch):
    seen = {}

    def check(problems, completions, timeout, backend):
        seen.update(n=len(problems), timeout=timeout, backend=backend, longest=max(len(c) for c in completions))
        return [{"passed": True, "result": "passed"} for _ in problems]

    monkeypatch.setattr(evaluate, "humaneval_problems", lambda: PROBLEMS)
    monkeypatch.setattr(evaluate, "check_completions", check)
    out = tmp_path / "he.json"
    assert eval_main(["humaneval", "--methods", "ar,tidar", "--limit", "2", "--timeout", "3.5", "--exec", "subprocess",
                      "--max-new-tokens", "6", "--no-progress", "--json", str(out)]) == 0
    assert seen == {"n": 2, "timeout": 3.5, "backend": "subprocess", "longest": seen["longest"]}
    assert seen["longest"] <= 6  # CharTokenizer: one character per token
    report = json.loads(out.read_text())
    assert report["problems"] == 2 and report["timeout_s"] == 3.5 and report["exec_backend"] == "subprocess"
    assert report["methods"]["tidar"]["matches_ar"] == 1.0
    assert eval_main(["humaneval", "--timeout", "0"]) == 2


def test_eval_ppl_batch_size_and_max_batches(tmp_path):
    from tidar.train.shards import build_shards

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(" ".join("".join(rng.choice(list("abcdefgh"), 4)) for _ in range(200)))
    build_shards([str(corpus)], CharTokenizer(), tmp_path / "shards", val_fraction=0.5, progress=False)
    save_pretrained(tiny_model(seed=4), tmp_path / "model")

    def ppl(*argv: str) -> dict:
        out = tmp_path / "ppl.json"
        assert eval_main(["ppl", "--data", str(tmp_path / "shards"), "--model", str(tmp_path / "model"),
                          "--seq-len", "16", "--json", str(out), *argv]) == 0
        return json.loads(out.read_text())

    full, capped = ppl("--batch-size", "2"), ppl("--batch-size", "2", "--max-batches", "3")
    assert capped["batches"] == 3 and capped["tokens"] == 3 * 2 * 15 and full["batches"] > 3
    assert ppl("--batch-size", "1", "--max-batches", "3")["tokens"] == 3 * 15


def test_eval_humaneval_reports_pass_at_1_per_swept_run(rt, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "humaneval_problems", lambda: PROBLEMS)
    monkeypatch.setattr(evaluate, "check_completions",
                        lambda problems, completions, timeout, backend: [{"passed": True, "result": "ok"} for _ in problems])
    out = tmp_path / "he.json"
    assert eval_main(["humaneval", "--methods", "ar,tidar-diffusion", "--block-sizes", "2,3", "--max-new-tokens", "6",
                      "--exec", "subprocess", "--no-progress", "--json", str(out)]) == 0
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {"ar", "tidar-diffusion-b2", "tidar-diffusion-b3"}
    assert all(m["pass@1"] == 1.0 and m["matches_ar"] == 1.0 for m in methods.values())


def test_bench_samples_with_every_engine_method_and_reports_no_matches_ar(rt, tmp_path, monkeypatch):
    seen = []
    real = runners.generate

    def spy(model, prompts, cfg, **kw):
        seen.append((cfg.mode, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed))
        return real(model, prompts, cfg, **kw)

    monkeypatch.setattr(runners, "generate", spy)
    report = run_bench(tmp_path, "--methods", "ar,tidar", "--do-sample", "--temperature", "0.7", "--top-p", "0.9",
                       "--seed", "1")
    assert report["config"]["sampling"] == {"temperature": 0.7, "top_k": None, "top_p": 0.9, "seed": 1}
    assert {s[0] for s in seen} == {"ar", "tidar"}
    assert set(seen) == {(mode, True, 0.7, None, 0.9, 1) for mode in ("ar", "tidar")}  # warm-ups included
    for m in report["methods"].values():
        assert m["matches_ar"] is None and m["divergences"] == [] and m["generated_tokens"] > 0
    seen.clear()
    greedy = run_bench(tmp_path, "--methods", "ar,tidar")
    assert greedy["config"]["sampling"] is None and greedy["methods"]["tidar"]["matches_ar"] == 1.0
    assert {s[1] for s in seen} == {False}


def test_bench_sampling_flags_need_do_sample_and_a_method_that_samples(rt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "abc"}\n')
    assert bench_main(["--prompts", str(prompts), "--top-p", "0.9"]) == 2  # ignored without --do-sample
    assert bench_main(["--prompts", str(prompts), "--methods", "ar,hf", "--do-sample"]) == 2  # hf decodes greedily
    assert bench_main(["--prompts", str(prompts), "--do-sample", "--temperature", "0"]) == 2
    assert bench_main(["--prompts", str(prompts), "--do-sample", "--top-p", "1.5"]) == 2


def test_bench_sampled_outputs_follow_the_seed_and_differ_from_greedy(rt):
    from tidar.measure.bench import run_bench as bench_run

    prompts = [rt.encode(p) for p in ("def f(x):", "abc abc abc", "hello")]

    def outputs(**sampling):
        opts = runners.BenchOptions(sampling=sampling)
        built = runners.build_runners(rt, ["ar", "tidar"], opts)
        return bench_run(rt, prompts, ["ar", "tidar"], 12, runners=built, warmup=0).outputs

    greedy = outputs()
    sampled = outputs(do_sample=True, temperature=1.5, seed=1)
    assert sampled == outputs(do_sample=True, temperature=1.5, seed=1)  # one seed, one draw
    for m in ("ar", "tidar"):
        assert sampled[m] != greedy[m]
