"""SmolLM2-135M's projections on the GGUF's Q4_1 blocks vs the dense bfloat16 path, by number of rows.

    .venv/bin/python benchmarks/int4_linear.py --json benchmarks/results/int4-linear-2026-12-06.json

Layer 0's weights from the shipped GGUF, fused as the engine fuses them (q|k|v, o, gate|up, down);
bfloat16 activations, 2 threads. Methods, all timed per call, interleaved (every method at every row
count once per repeat), medians over the repeats:

- bf16-packed: the engine's dense path today (`transformer.pack_weight` + `linear`, oneDNN);
- q4: `quant.Q4Weight`, the project's kernel on the Q4_1 blocks (the GGUF's exact values, rows independent);
- torch-int4: `torch.ops.aten._weight_int4pack_mm_for_cpu` with bfloat16 scales (its fast path; the
  weights are not the GGUF's: the scales round);
- torch-int4-fp32: the same kernel with float32 activations and scales (exact, but a scalar loop);
  only at rows <= --fp32-rows;
- dequant-linear: dequantize the blocks to bfloat16 on every call, then F.linear.

The step estimate adds 30 layers of the four projections and the LM head (Q8_0 in the GGUF: dense
bfloat16 for every method) at each row count.

`--decode N` then decodes the first N HumanEval prompts with the shipped model at its operating point,
AR and TiDAR, on both paths (bf16 dense; `quant.quantize_q4_` on the GGUF), interleaved per prompt:
tokens/s per path and mode, and whether TiDAR's output equals AR's on each path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tidar.model import quant
from tidar.model.transformer import linear, pack_weight
from tidar.model.weights import smollm2_gguf_path

PARTS = {"qkv": ["attn_q", "attn_k", "attn_v"], "o": ["attn_output"], "gate_up": ["ffn_gate", "ffn_up"], "down": ["ffn_down"]}
ROWS = (1, 2, 4, 8, 12, 16, 20, 32)
LAYERS = 30


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def methods(raw: np.ndarray, fp32: bool) -> dict[str, Callable[[torch.Tensor], object]]:
    d, m, q = quant.q4_1_fields(raw)
    dense = quant.dequantize_q4_1(d, m, q).bfloat16()
    packed = pack_weight(dense)
    q4 = quant.Q4Weight.from_fields(d, m, q)
    p16, sz16 = quant.to_int4pack(d, m, q, torch.bfloat16)
    out = {
        "bf16-packed": lambda x: linear(x[None], dense, packed),
        "q4": lambda x: q4(x),
        "torch-int4": lambda x: quant.int4pack_linear(x, p16, sz16),
        "dequant-linear": lambda x: F.linear(x, q4.dequantize().bfloat16()),
    }
    if fp32:
        p32, sz32 = quant.to_int4pack(d, m, q, torch.float32)
        out["torch-int4-fp32"] = lambda x: quant.int4pack_linear(x.float(), p32, sz32)
    return out


def measure(args: argparse.Namespace) -> dict[str, dict[str, dict[int, list[float]]]]:
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: np.concatenate([np.asarray(tensors[f"blk.0.{p}.weight"].data) for p in parts])
              for name, parts in PARTS.items()}
    head = tensors["token_embd.weight"]  # Q8_0, tied LM head: dense bf16 for every method
    from gguf.quants import dequantize

    head_w = torch.from_numpy(dequantize(np.asarray(head.data), head.tensor_type)).bfloat16()
    head_packed = pack_weight(head_w)
    fns = {name: methods(raw, fp32=True) for name, raw in shapes.items()}
    fns["lm_head"] = {"bf16-packed": lambda x: linear(x[None], head_w, head_packed)}
    g = torch.Generator().manual_seed(0)
    xs = {(name, r): torch.randn(r, (raw.shape[1] // quant.BLOCK_BYTES) * quant.GROUP, generator=g).bfloat16()
          for name, raw in shapes.items() for r in ROWS}
    xs.update({("lm_head", r): torch.randn(r, 576, generator=g).bfloat16() for r in ROWS})
    times: dict[str, dict[str, dict[int, list[float]]]] = {n: {m: {} for m in f} for n, f in fns.items()}
    for rep in range(args.repeats):
        for name, f in fns.items():
            for r in ROWS:
                order = list(f.items())
                order = order[rep % len(order):] + order[:rep % len(order)]  # rotate who goes first
                for method, fn in order:
                    if method == "torch-int4-fp32" and r > args.fp32_rows:
                        continue
                    x = xs[(name, r)]
                    calls = max(3, args.calls // (10 if method in ("torch-int4-fp32", "dequant-linear") else 1))
                    per_call_us(lambda fn=fn, x=x: fn(x), 3)  # warm caches after the other methods ran
                    times[name][method].setdefault(r, []).append(per_call_us(lambda fn=fn, x=x: fn(x), calls))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
    return times


def summarize(times: dict[str, dict[str, dict[int, list[float]]]]) -> dict[str, object]:
    med = {n: {m: {r: statistics.median(v) for r, v in by.items()} for m, by in ms.items()} for n, ms in times.items()}
    step = {}
    for method in ("bf16-packed", "q4", "torch-int4"):
        proj = {r: LAYERS * sum(med[n][method][r] for n in PARTS) / 1e3 for r in ROWS}
        step[method] = {"projections_ms": proj, "with_lm_head_ms": {r: proj[r] + med["lm_head"]["bf16-packed"][r] / 1e3 for r in ROWS}}
    return {"median_us": med, "step_estimate": step}


def print_tables(summary: dict[str, object]) -> None:
    med = summary["median_us"]
    for name, ms in med.items():
        print(f"\n{name:>8} " + " ".join(f"{f'r={r}':>8}" for r in ROWS) + "   (us per call, median)")
        for method, by in ms.items():
            print(f"{method:>16} " + " ".join(f"{by[r]:>8.0f}" if r in by else f"{'-':>8}" for r in ROWS))
    print(f"\n{'step (ms)':>16} " + " ".join(f"{f'r={r}':>8}" for r in ROWS) + "   (30 layers x 4 projections + LM head)")
    for method, est in summary["step_estimate"].items():
        print(f"{method:>16} " + " ".join(f"{est['with_lm_head_ms'][r]:>8.1f}" for r in ROWS))


def decode_ab(n_prompts: int, max_new_tokens: int) -> dict[str, object]:
    from tidar.decode import generate
    from tidar.measure.prompts import humaneval_problems
    from tidar.runtime import Runtime

    paths = {"bf16": Runtime.load(compile=False), "q4": Runtime.load(compile=False)}
    quant.quantize_q4_(paths["q4"].model, smollm2_gguf_path())
    runs = [(p, m) for p in paths for m in ("ar", "tidar")]
    tokens = dict.fromkeys(runs, 0)
    seconds = dict.fromkeys(runs, 0.0)
    forwards = dict.fromkeys(runs, 0)
    outputs: dict[tuple[str, str], list[list[int]]] = {r: [] for r in runs}
    for i, problem in enumerate(humaneval_problems()[:n_prompts]):
        ids = paths["bf16"].encode(problem["prompt"])
        for path, mode in runs[i % len(runs):] + runs[:i % len(runs)]:  # rotate who goes first
            rt = paths[path]
            cfg = rt.generation_config(mode=mode, max_new_tokens=max_new_tokens)
            t = time.perf_counter()
            out = generate(rt.model, [ids], cfg)
            seconds[(path, mode)] += time.perf_counter() - t
            outputs[(path, mode)].append(out.sequences[0])
            tokens[(path, mode)] += len(out.sequences[0])
            forwards[(path, mode)] += out.stats.forwards
        print(f"prompt {i + 1}/{n_prompts} done", flush=True)
    report = {f"{p}/{m}": {"tokens": tokens[(p, m)], "seconds": seconds[(p, m)], "tok_s": tokens[(p, m)] / seconds[(p, m)],
                           "tokens_per_forward": tokens[(p, m)] / forwards[(p, m)]} for p, m in runs}
    for p in paths:
        report[f"{p}/tidar_equals_ar"] = sum(a == b for a, b in zip(outputs[(p, "ar")], outputs[(p, "tidar")], strict=True))
    report["q4_ar_equals_bf16_ar"] = sum(a == b for a, b in zip(outputs[("q4", "ar")], outputs[("bf16", "ar")], strict=True))
    report["prompts"] = n_prompts
    report["max_new_tokens"] = max_new_tokens
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=40, help="calls per timing (a tenth for the slow methods)")
    ap.add_argument("--fp32-rows", type=int, default=8, help="time torch-int4-fp32 up to this many rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=0, help="then decode this many HumanEval prompts on both paths")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-matmuls", action="store_true", help="only the --decode A/B")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not quant.available():
        raise SystemExit(f"Q4_1 kernel unavailable: {quant.unavailable_reason()}")
    started = datetime.datetime.now(datetime.timezone.utc)
    cpu0 = os.times()
    times = {} if args.skip_matmuls else measure(args)
    summary = summarize(times) if times else {}
    if summary:
        print_tables(summary)
    if args.decode:
        summary["decode"] = decode_ab(args.decode, args.max_new_tokens)
        print(json.dumps(summary["decode"], indent=1))
    cpu1 = os.times()
    if args.json:
        wall = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
        load = os.getloadavg()
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json")
        report = {"command": f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} benchmarks/int4_linear.py {flags}",
                  "date": started.isoformat(timespec="seconds"), "torch": torch.__version__, "threads": args.threads,
                  "cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "loadavg_after": load,
                  "process_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), "wall_s": wall,
                  "rows": list(ROWS), **summary, "samples_us": times}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
