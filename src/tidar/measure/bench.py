"""`tidar bench`: every decoding method side by side, on the same prompts, in one process.

Methods run interleaved per prompt (prompt 1: every method, prompt 2: every method, ...) with the
method order rotated per prompt, so machine noise (another job, thermal throttling, the page
cache) hits all of them alike. Each method gets warm-up generations first and model loading is
never timed. tokens/s = generated tokens / generation wall time (prefill included), summed over
prompts, the same measure for every method.

`matches_ar` compares each method's greedy token ids with our AR engine's, up to max_new_tokens
and the first EOS; for every diverging prompt it records where, and how close the AR model's top
two logits were there (a near-tie explains a bfloat16 rounding difference; a wide margin is a bug).
With sampling (`do_sample`) every method draws its own random tokens, so `matches_ar` is null: losslessness
under sampling is a statement about distributions, which tests/test_decoding.py checks.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tidar.decode import GenerationConfig, GenerationError
from tidar.decode.options import check_sweep
from tidar.masks import causal_mask
from tidar.measure.profile import step_tokens
from tidar.measure.prompts import BenchError, Prompt
from tidar.measure.runners import BenchOptions, Run, Runner, build_runners
from tidar.runtime import Runtime

WARMUP_TOKENS = 32  # enough to touch every code path (prefill, steps, cache growth) without doubling the run


@dataclass
class BenchResult:
    methods: dict[str, dict[str, Any]]  # the per-method summaries of the JSON report
    outputs: dict[str, list[list[int]]]  # method -> generated ids per prompt
    runs: dict[str, list[Run]] = field(default_factory=dict)


def method_order(methods: Sequence[str], prompt_index: int) -> list[str]:
    """Rotate by one per prompt, so no method is always first (cold caches) or last."""
    k = prompt_index % len(methods)
    return list(methods[k:]) + list(methods[:k])


def normalize(tokens: Sequence[int], eos_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """What "the same greedy output" compares: up to max_new_tokens, and nothing after the first EOS."""
    out = []
    for t in list(tokens)[:max_new_tokens]:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def ar_top2_margin(model: Any, prompt: Sequence[int], ar_prefix: Sequence[int]) -> float:
    """Top-1 minus top-2 AR logit for the token after prompt + ar_prefix (one causal forward)."""
    ids = torch.tensor([list(prompt) + list(ar_prefix)])
    n = ids.shape[1]
    with torch.inference_mode():
        logits = model(ids, torch.arange(n)[None], causal_mask(n), logits_index=torch.tensor([n - 1]))
    top = torch.topk(logits[0, -1].float(), 2).values
    return round(float(top[0] - top[1]), 5)


def summarize(runs: dict[str, list[Run]], prompts: Sequence[Sequence[int]], max_new_tokens: int,
              eos_ids: Sequence[int], margin: Callable[[Sequence[int], Sequence[int]], float] | None = None,
              ) -> dict[str, dict[str, Any]]:
    """Per-method report entries; `margin(prompt, ar_prefix)` scores divergences."""
    ar_runs = runs.get("ar")
    summary: dict[str, dict[str, Any]] = {}
    for m, rs in runs.items():
        gen = sum(len(r.tokens) for r in rs)
        wall = sum(r.wall_s for r in rs)
        known = all(r.forwards is not None for r in rs)
        forwards = sum(r.forwards or 0 for r in rs) if known else None
        decode = sum(r.decode_tokens or 0 for r in rs) if known else None
        hists = [r.acceptance_histogram for r in rs if r.acceptance_histogram]
        hist = None
        if hists:
            hist = [0] * max(len(h) for h in hists)
            for h in hists:
                for i, c in enumerate(h):
                    hist[i] += c
        n_acc = sum(hist) if hist else 0
        rows = sum(r.query_tokens or 0 for r in rs) if all(r.query_tokens is not None for r in rs) else None
        by_source: dict[str, int] | None = None
        if any(r.accepted_drafts for r in rs):
            by_source = {}
            for r in rs:
                for k, v in (r.accepted_drafts or {}).items():
                    by_source[k] = by_source.get(k, 0) + v
        entry: dict[str, Any] = {
            "tokens_per_s": round(gen / wall, 3) if wall > 0 else None,
            "tokens_per_forward": round(decode / forwards, 4) if forwards else None,
            "query_tokens_per_forward": round(rows / forwards, 3) if rows is not None and forwards else None,
            "speedup_vs_ar": None,
            "matches_ar": None,
            "mean_acceptance": round(sum((i + 1) * c for i, c in enumerate(hist)) / n_acc, 4) if n_acc else None,
            "acceptance_histogram": hist,
            "accepted_drafts": by_source,
            "generated_tokens": gen,
            "forwards": forwards,
            "wall_s": round(wall, 4),
            "divergences": [],
        }
        if ar_runs is not None and not any(r.sampled for r in (*rs, *ar_runs)):  # random draws never match
            same = 0
            for p, (r, a) in enumerate(zip(rs, ar_runs, strict=True)):
                mine, ref = normalize(r.tokens, eos_ids, max_new_tokens), normalize(a.tokens, eos_ids, max_new_tokens)
                i = first_difference(mine, ref)
                if i is None:
                    same += 1
                    continue
                gap = margin(prompts[p], ref[:i]) if margin is not None and i <= len(ref) else None
                entry["divergences"].append({"prompt_index": p, "first_diff_index": i, "ar_top2_margin": gap})
            entry["matches_ar"] = round(same / len(rs), 4) if rs else None
        summary[m] = entry
    ar_tps = summary.get("ar", {}).get("tokens_per_s")
    for entry in summary.values():
        if ar_tps and entry["tokens_per_s"] is not None:
            entry["speedup_vs_ar"] = round(entry["tokens_per_s"] / ar_tps, 4)
    return summary


def run_bench(runtime: Any, prompts: Sequence[Sequence[int]], methods: Sequence[str], max_new_tokens: int, *,
              runners: dict[str, Runner], warmup: int = 1, stop: Sequence[str] = (), progress: bool = False,
              ) -> BenchResult:
    """Run every method on every prompt (token ids), interleaved per prompt; summarize."""
    if not prompts:
        raise BenchError("no prompts to run")
    for m in methods:
        for _ in range(warmup):
            runners[m](list(prompts[0]), min(max_new_tokens, WARMUP_TOKENS), stop)
        reset = getattr(getattr(runners[m], "fn", None), "reset", None)
        if reset is not None:  # a learning runner must not have seen the first prompt's output
            reset()
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="bench", unit="prompt", file=sys.stderr)
    for p, ids in enumerate(prompts):
        for m in method_order(methods, p):
            runs[m].append(runners[m](list(ids), max_new_tokens, stop))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model = getattr(runtime, "model", None)
    margin = (lambda prompt, prefix: ar_top2_margin(model, prompt, prefix)) if model is not None else None
    summary = summarize(runs, prompts, max_new_tokens, runtime.eos_ids, margin)
    return BenchResult(summary, {m: [r.tokens for r in rs] for m, rs in runs.items()}, runs)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
                            "python": platform.python_version(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    for pkg in ("transformers", "llama_cpp"):
        if importlib.util.find_spec(pkg) is not None:
            try:
                info[pkg] = importlib.import_module(pkg).__version__
            except Exception:  # noqa: BLE001 - a version string is not worth failing a benchmark for
                info[pkg] = None
    return info


class CpuMonitor:
    """Share of the machine's CPU time used by *other* processes between start() and stop():
    busy time from /proc/stat minus this process's own CPU time. Load averages cannot tell a
    benchmark's own threads from a competing job; this can."""

    def start(self) -> CpuMonitor:
        self._t0 = self._sample()
        return self

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            parts = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)  # idle + iowait
        total = sum(parts[:8])  # guest time is already counted in user
        own = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return (total - idle) / hz, total / hz, own

    def stop(self) -> float | None:
        t1 = self._sample()
        if self._t0 is None or t1 is None or t1[1] <= self._t0[1]:
            return None
        busy, total, own = (b - a for a, b in zip(self._t0, t1, strict=True))
        return round(min(max((busy - own) / total, 0.0), 1.0), 3)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    w = max([16, *map(len, methods)])
    rows = [f"{'method':<{w}} {'tok/s':>9} {'tok/fwd':>8} {'speedup':>8} {'matches_ar':>10} {'mean acc':>9} "
            f"{'rows/fwd':>9}"]
    for name, e in methods.items():
        rows.append(f"{name:<{w}} {f(e['tokens_per_s'], '.1f'):>9} {f(e['tokens_per_forward'], '.2f'):>8} "
                    f"{f(e['speedup_vs_ar'], '.2f'):>8} {f(e['matches_ar'], '.2f'):>10} "
                    f"{f(e['mean_acceptance'], '.2f'):>9} {f(e.get('query_tokens_per_forward'), '.1f'):>9}")
    return "\n".join(rows)


def tidar_step_tokens(runtime: Any, opts: BenchOptions) -> int:
    """Tokens in one TiDAR forward at the benchmarked operating point (b clean + one block per
    pre-drafted acceptance length)."""
    cfg = runtime.generation_config(**opts.engine)
    return step_tokens(cfg.block_size or runtime.model.config.block_size, cfg.policy)


def check_options(opts: BenchOptions) -> None:
    """What the options can get wrong before any model is loaded (the engine's own options are
    checked by GenerationConfig)."""
    if opts.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {opts.warmup}")
    if not opts.thresholds or not all(0.0 < t <= 1.0 for t in opts.thresholds):
        raise BenchError(f"--thresholds must be in (0, 1], got {list(opts.thresholds)}")
    try:
        check_sweep({"block_size": opts.block_sizes, "policy": opts.policies, "beta": opts.betas})
    except GenerationError as e:
        raise BenchError(f"--block-sizes/--policies/--betas: {e}") from None
    check_sampling(opts)
    if opts.model is not None and opts.model not in ("smollm2", "base") and not Path(opts.model).exists():
        raise BenchError(f"model path {opts.model} does not exist (give a checkpoint directory, or 'smollm2')")


def check_sampling(opts: BenchOptions) -> None:
    """The sampling options: valid together, and given only with do_sample (else they would be ignored
    and the report would show greedy numbers the user did not ask for)."""
    ignored = [k for k in opts.sampling if k != "do_sample"] if not opts.sampled else []
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        raise BenchError(f"{flags} only apply with --do-sample")
    try:
        GenerationConfig(**opts.sampling).validate()
    except GenerationError as e:
        raise BenchError(str(e)) from None


def benchmark(opts: BenchOptions, prompts: Sequence[Prompt], methods: Sequence[str], max_new_tokens: int,
              source: str, progress: bool = True) -> tuple[dict[str, Any], Any]:
    """Load the model and every method's runner, run the methods side by side, and return the JSON
    report (with the machine's load during the run) and the runtime."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    load_start = load_average()
    rt = Runtime.load(opts.model, dtype=opts.dtype, compile=opts.compile, weights=opts.weights)
    ids = [rt.encode(p.text, p.chat) for p in prompts]
    runners = build_runners(rt, methods, opts, max_len=max(len(x) for x in ids) + max_new_tokens + 64)
    cpu = CpuMonitor().start()
    result = run_bench(rt, ids, list(runners), max_new_tokens, runners=runners, warmup=opts.warmup, progress=progress)
    other_cpu = cpu.stop()
    report = {
        "model": rt.name, "dtype": opts.dtype, "threads": torch.get_num_threads(), "compiled": rt.compiled,
        "weights": rt.weights, "kernels": rt.model.kernels_on, "prompts": len(prompts), "source": source, "max_new_tokens": max_new_tokens,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "machine": {**machine_info(), "load_average_start": load_start, "load_average_end": load_average(),
                    "other_cpu_share": other_cpu},
        "config": {**opts.as_dict(), "tidar_step_tokens": tidar_step_tokens(rt, opts) if "tidar" in methods else None},
        "methods": result.methods,
    }
    return report, rt

