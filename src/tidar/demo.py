"""`make demo`: TiDAR vs AR side by side on the default model, streamed, with the measured ratio, and
what TiDAR's diffusion drafts achieve alone (without the copy drafts of the shipped mix)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from tidar.decode.options import DIFFUSION_ONLY
from tidar.runtime import Runtime, TextResult

PROMPTS = [
    ("code", 'def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same forwards and backwards."""\n', False),
    ("prose", "The history of the printing press begins", False),
    ("chat", "Write a Python function that returns the n-th Fibonacci number.", True),
]

# the TiDAR runs compared with AR: (row key of "identical to AR", what the reader sees, config overrides)
VARIANTS = [
    ("matches_ar", "TiDAR (shipped mix)", {}),
    ("diffusion_matches_ar", "diffusion drafts alone", DIFFUSION_ONLY),
]


def step_cost_note(tidar: dict, ar: dict) -> str:
    """Why the speedup is what it is: TiDAR's step cost against AR's, both measured just now."""
    t_step = tidar["forward_s"] / max(tidar["forwards"], 1)
    a_step = ar["forward_s"] / max(ar["forwards"], 1)
    if not a_step:
        return "step costs unknown"
    ratio = t_step / a_step
    return (f"a TiDAR step cost {t_step * 1e3:.1f} ms vs {a_step * 1e3:.1f} ms for an AR step ({ratio:.2f}x), so TiDAR "
            f"wins only above {ratio:.2f} tokens/forward")


def run_demo(model: str | None = None, dtype: str = "bfloat16", max_new_tokens: int = 96,
             out_dir: str | Path = "out/demo", compile: bool | None = None, weights: str | None = None,
             exact_check: bool = True) -> list[dict]:
    """Each of PROMPTS decoded by TiDAR's shipped mix (streamed), AR and TiDAR with diffusion drafts
    only, with the measured speed ratios; rows go to out_dir/demo.json and out_dir/demo.png. With
    `exact_check`, prompts whose outputs differed in a lower precision are decoded again in float32,
    where rounding ties cannot hide a real difference."""
    t = time.perf_counter()
    rt = Runtime.load(model, dtype=dtype, compile=compile, weights=weights)
    how = f"{dtype}, {rt.weights} weights{', compiled' if rt.compiled else ''}, {torch.get_num_threads()} threads"
    print(f"model: {rt.name} ({how}, loaded in {time.perf_counter() - t:.1f}s)")
    if not rt.operating_point:
        print("note: no trained TiDAR drafter found; using the base model's untrained [MASK] drafts "
              "(output is still identical to AR, but few drafts are accepted)")
    # warm-up so the first timed prompt does not pay for allocator and kernel start-up
    for overrides in ({}, {"mode": "ar"}, DIFFUSION_ONLY):
        rt.generate_text("Hello", rt.generation_config(max_new_tokens=8, **overrides))
    check = exact_check and dtype != "float32"
    rows = [_compare(rt, name, prompt, chat, max_new_tokens, dtype, check) for name, prompt, chat in PROMPTS]
    differed = [i for i, r in enumerate(rows) if not all(r[key] for key, _, _ in VARIANTS)]
    if check and differed:
        _float32_check(model, rows, differed, dtype, max_new_tokens, rt.weights)
    _write(rows, Path(out_dir))
    return rows


def _speedup(run: TextResult, ar: TextResult) -> float:
    return run.stats["tokens_per_s"] / ar.stats["tokens_per_s"] if ar.stats["tokens_per_s"] else 0.0


def _compare(rt: Runtime, name: str, prompt: str, chat: bool, max_new_tokens: int, dtype: str,
             checked_later: bool) -> dict:
    print(f"\n=== {name} prompt ===\n{prompt}")
    print("--- TiDAR, shipped mix (diffusion + copy drafts), streamed as committed ---")
    ti = rt.generate_text(prompt, rt.generation_config(max_new_tokens=max_new_tokens), chat=chat, stream=sys.stdout)
    ar = rt.generate_text(prompt, rt.generation_config(mode="ar", max_new_tokens=max_new_tokens), chat=chat)
    di = rt.generate_text(prompt, rt.generation_config(max_new_tokens=max_new_tokens, **DIFFUSION_ONLY), chat=chat)
    print("\n--- AR ---")
    print(ar.text)
    same = ti.tokens == ar.tokens
    note = "" if same else _difference_note(rt, prompt, chat, ar.tokens, ti.tokens, dtype, checked_later)
    print(f"--- AR: {_rate(ar)}")
    print(_speed_line("TiDAR shipped mix (diffusion + copy drafts)", ti, ar, note))
    print(_speed_line("diffusion drafts alone (the paper's TiDAR)", di, ar, _short_note(di, ar, checked_later)))
    print(f"--- {step_cost_note(ti.stats, ar.stats)}")
    src = ti.stats.get("accepted_drafts") or {}
    print(f"--- draft tokens accepted (shipped mix): {src.get('diffusion', 0)} from the diffusion block, "
          f"{src.get('lookup', 0)} from prompt lookup, {src.get('datastore', 0)} from the datastore")
    return {"prompt": name, "matches_ar": same, "diffusion_matches_ar": di.tokens == ar.tokens, "tidar": ti.stats,
            "tidar_diffusion": di.stats, "ar": ar.stats, "speedup_vs_ar": _speedup(ti, ar),
            "diffusion_speedup_vs_ar": _speedup(di, ar)}


def _rate(run: TextResult) -> str:
    return f"{run.stats['tokens_per_forward']:.2f} tokens/forward, {run.stats['tokens_per_s']:.1f} tok/s"


def _speed_line(label: str, run: TextResult, ar: TextResult, note: str) -> str:
    """One TiDAR run against AR: its rate, its speedup, and whether its output is AR's."""
    same = run.tokens == ar.tokens
    return f"--- {label}: {_rate(run)} ({_speedup(run, ar):.2f}x AR), identical to AR: {same}{note}"


def _short_note(run: TextResult, ar: TextResult, checked_later: bool) -> str:
    from tidar.measure.bench import first_difference

    if run.tokens == ar.tokens:
        return ""
    check = "; float32 check below" if checked_later else ""
    return f" (first difference at token {first_difference(ar.tokens, run.tokens)}{check})"


def _difference_note(rt: Runtime, prompt: str, chat: bool, ar: list[int], tidar: list[int], dtype: str,
                     checked_later: bool) -> str:
    from tidar.measure.bench import ar_top2_margin, first_difference

    k = first_difference(ar, tidar)
    margin = ar_top2_margin(rt.model, rt.encode(prompt, chat), ar[:k])
    check = "float32 check below" if checked_later else "in float32 TiDAR matched AR on every benchmarked prompt"
    return (f" (first difference at token {k}, where AR's top-2 logits differ by only {margin:.3f}: a "
            f"near-tie that {dtype} rounding flips between a multi-token and a one-token forward; {check})")


def _float32_check(model: str | None, rows: list[dict], differed: list[int], dtype: str, max_new_tokens: int,
                   weights: str) -> None:
    """Decodes again in float32 each TiDAR run (shipped mix, diffusion drafts alone) whose output
    differed from AR's; records `<key>_float32` in its row for each key of VARIANTS that was False."""
    print(f"\n=== exactness check: the {len(differed)} prompt(s) whose {dtype} outputs differed, in float32 ===")
    rt32 = Runtime.load(model, dtype="float32", compile=False, weights=weights)
    for i in differed:
        name, prompt, chat = PROMPTS[i]
        ar = rt32.generate_text(prompt, rt32.generation_config(mode="ar", max_new_tokens=max_new_tokens), chat=chat)
        for key, label, overrides in VARIANTS:
            if rows[i][key]:
                continue
            gen = rt32.generation_config(max_new_tokens=max_new_tokens, **overrides)
            run = rt32.generate_text(prompt, gen, chat=chat)
            rows[i][f"{key}_float32"] = run.tokens == ar.tokens
            print(f"--- {name}: {label} identical to AR in float32: {run.tokens == ar.tokens} "
                  f"({run.stats['tokens_per_forward']:.2f} tokens/forward)")


def _write(rows: list[dict], out: Path) -> None:
    from tidar.measure.plots import plot_demo

    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nplots written to {plot_demo(rows, out / 'demo.png')}")
    print(f"results written to {out / 'demo.json'}")
