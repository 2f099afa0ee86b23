"""Measure what a forward over T new tokens costs on this machine, and pick the TiDAR operating
point (block size b, pre-draft policy) that maximises expected tokens/s from that profile and the
measured acceptance statistics. On a CPU the "free token slots" are few, so this is a measurement,
not a constant."""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tidar.decode.step import FREE_ROWS
from tidar.masks import causal_mask, with_prefix
from tidar.model.transformer import KVCache, Transformer


def forward_steps(model: Transformer, tokens: Sequence[int], prefix: int = 256,
                  masks: Sequence[bool] = (True, False)) -> dict[tuple[bool, int], Callable[[], None]]:
    """One engine forward per (with [MASK] rows, T new tokens) after a `prefix`-token cache, as
    closures to call under `torch.inference_mode()` (see `latency_profiles`).

    With masks, a multi-token forward is a TiDAR step: its first token is a draft and the rest are
    [MASK] tokens, so the adapter's work is in every such step. Without, it is a plain verification
    step (an AR step, or a lookup span checked without pre-drafting).
    """
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, 1, prefix + max(tokens), dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prefix), generator=g)
    with torch.inference_mode():
        model(ids, torch.arange(prefix)[None], causal_mask(prefix), cache=cache, offset=0, return_hidden=True)
    cache.valid[:, :prefix] = True
    cache.truncate(prefix)

    def step(new: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> None:
        # every step writes the same cache slots after the prefix, and attends to no stale ones
        h = model(new, pos, mask, cache=cache, offset=prefix, return_hidden=True)
        model.head(h[:, :FREE_ROWS])  # the engine scores every row of a step up to FREE_ROWS

    steps = {}
    for with_masks in masks:
        for n in tokens:
            new = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
            if with_masks:
                new[:, 1:] = model.config.mask_token_id
            pos = torch.arange(prefix, prefix + n)[None]
            mask = with_prefix(causal_mask(n), cache.valid[:, :prefix])
            steps[(with_masks, n)] = functools.partial(step, new, pos, mask)
    return steps


@torch.inference_mode()
def latency_profiles(model: Transformer, tokens: Sequence[int], prefix: int = 256, repeats: int = 5,
                     masks: Sequence[bool] = (True, False)) -> dict[bool, dict[int, float]]:
    """Median seconds of one forward over T new tokens after a `prefix`-token cache, for each T in
    `tokens`, with [MASK] rows (True) and without (False) (`forward_steps`; with masks the adapter's
    work is mostly a fixed cost per call here, whatever the number of mask rows). Every shape is
    timed once per round, round after round, so a slow drift of the machine hits all shapes alike.
    """
    steps = forward_steps(model, tokens, prefix, masks)
    times: dict[tuple[bool, int], list[float]] = {key: [] for key in steps}
    for r in range(repeats + 1):  # round 0 warms up allocators and kernels
        for key, step in steps.items():
            t = time.perf_counter()
            step()
            if r:
                times[key].append(time.perf_counter() - t)
    return {m: {n: statistics.median(times[(m, n)]) for n in tokens} for m in masks}


def forward_latency(model: Transformer, n_tokens: int, prefix: int = 256, repeats: int = 5,
                    masks: bool = True) -> float:
    """Median seconds of one forward over `n_tokens` new tokens (see `latency_profiles`)."""
    return latency_profiles(model, [n_tokens], prefix, repeats, (masks,))[masks][n_tokens]


def interpolate(profile: dict[int, float], t: int) -> float:
    xs = sorted(profile)
    if t <= xs[0]:
        return profile[xs[0]] * t / xs[0] if t < xs[0] else profile[xs[0]]
    for lo, hi in zip(xs, xs[1:], strict=False):
        if lo <= t <= hi:
            w = (t - lo) / (hi - lo)
            return profile[lo] * (1 - w) + profile[hi] * w
    return profile[xs[-1]] * t / xs[-1]  # beyond the profile: compute-bound, linear


def step_tokens(block_size: int, policy: str) -> int:
    """Query tokens of one TiDAR step: b drafts + b masks per pre-drafted acceptance length."""
    blocks = {"all": block_size, "full": min(2, block_size)}[policy]
    return block_size + block_size * blocks


def expected_step_s(profile: dict[int, float], m: dict, plain_profile: dict[int, float] | None = None) -> float:
    """Mean seconds per step of a measured configuration. Steps with [MASK] rows are priced on
    `profile`; steps without (lookup spans verified without pre-drafting) on `plain_profile`, when
    both it and the measured split are known."""
    rows = m.get("query_tokens_per_forward") or step_tokens(m["block_size"], m["policy"])
    plain = m.get("plain_forwards") or 0
    if plain_profile is None or not plain or not m.get("forwards"):
        return interpolate(profile, rows)
    masked = m["forwards"] - plain
    plain_rows = m["plain_query_tokens"] / plain
    masked_s = interpolate(profile, (m["query_tokens"] - m["plain_query_tokens"]) / masked) if masked else 0.0
    return (masked * masked_s + plain * interpolate(plain_profile, plain_rows)) / m["forwards"]


def choose_operating_point(profile: dict[int, float], measured: Sequence[dict], ar_latency: float | None = None,
                           plain_profile: dict[int, float] | None = None) -> dict:
    """Rank candidates by expected tokens/s = measured tokens per forward / step latency from the
    profile. `measured`: dicts with block_size, policy, tokens_per_forward (from calibration runs)."""
    ar_latency = ar_latency if ar_latency is not None else interpolate(plain_profile or profile, 1)
    rows = []
    for m in measured:
        r = dict(m)
        # measured rows per step where known (prompt-lookup drafts vary the step's length)
        r["tokens"] = r.get("query_tokens_per_forward") or step_tokens(r["block_size"], r["policy"])
        r["step_s"] = expected_step_s(profile, r, plain_profile)
        r["expected_tokens_per_s"] = r["tokens_per_forward"] / r["step_s"]
        r["expected_speedup_vs_ar"] = r["expected_tokens_per_s"] * ar_latency
        rows.append(r)
    rows.sort(key=lambda r: -r["expected_tokens_per_s"])
    return {"best": rows[0], "candidates": rows}


CALIBRATION_PROMPTS = [
    'def mean(xs: list[float]) -> float:\n    """Return the arithmetic mean of xs."""\n',
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "In the beginning God created the heaven and the earth.",
]


def offset_acceptance(histogram: Sequence[int]) -> list[float]:
    """Conditional acceptance per draft offset from a histogram of acceptance lengths a = 1..b:
    P(a >= k + 1 | a >= k) for k = 1..b-1."""
    at_least = [sum(histogram[k:]) for k in range(len(histogram))]
    return [at_least[k] / at_least[k - 1] if at_least[k - 1] else 0.0 for k in range(1, len(histogram))]


def calibrate(runtime, block_sizes: Sequence[int], policies: Sequence[str] = ("all", "full"),  # noqa: ANN001
              max_new_tokens: int = 64, lookup_ngram: int = 0, lookup_tokens: Sequence[int] = (0,)) -> list[dict]:
    """Measured tokens per forward, and query tokens per forward (prompt-lookup drafts make steps
    longer), of each (b, policy, lookup_tokens) on a few built-in code and prose prompts. Steps
    without [MASK] rows are counted apart, to be priced on the plain profile."""
    out = []
    for b in block_sizes:
        for policy in policies:
            for lt in lookup_tokens if lookup_ngram else (0,):
                gen = runtime.generation_config(block_size=b, policy=policy, max_new_tokens=max_new_tokens,
                                                lookup_ngram=lookup_ngram, lookup_tokens=lt)
                hist: list[int] = []
                counts = dict.fromkeys(("forwards", "query_tokens", "plain_forwards", "plain_query_tokens"), 0)
                for prompt in CALIBRATION_PROMPTS:
                    st = runtime.generate_text(prompt, gen).stats
                    h = st["acceptance_histogram"]
                    hist = [x + y for x, y in zip(hist or [0] * len(h), h, strict=True)]
                    for k in counts:
                        counts[k] += st[k]
                steps = sum(hist)
                tpf = sum((i + 1) * c for i, c in enumerate(hist)) / steps if steps else 1.0
                out.append({"block_size": b, "policy": policy, "lookup_ngram": lookup_ngram, "lookup_tokens": lt,
                            "tokens_per_forward": tpf,
                            "query_tokens_per_forward": counts["query_tokens"] / max(counts["forwards"], 1),
                            **counts, "acceptance_histogram": hist, "offset_acceptance": offset_acceptance(hist)})
    return out


# new-token counts T timed by default: dense at the few-dozen-row steps TiDAR takes on a CPU
DEFAULT_TOKENS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 300)


def run_profile(model: str | None = None, dtype: str = "bfloat16", compile: bool | None = None, weights: str | None = None,
                tokens: Sequence[int] = DEFAULT_TOKENS, prefix: int = 256, repeats: int = 5,
                choose: bool = False, block_sizes: Sequence[int] = (2, 3, 4), lookup_ngram: int = 0,
                lookup_tokens: Sequence[int] = (0,), json_path: str | Path | None = None) -> dict[str, Any]:
    """`tidar profile`: print the latency profile of `model` (and, with `choose`, the operating
    point it implies; see `calibrate` for block_sizes, lookup_ngram and lookup_tokens), optionally
    write it to `json_path`, and return it."""
    from tidar.runtime import Runtime

    tokens = sorted(set(tokens))
    rt = Runtime.load(model, dtype=dtype, compile=compile, weights=weights)  # the engine's model: fused (+compiled)
    print(f"forward latency, {dtype}, {rt.weights} weights{', compiled' if rt.compiled else ''}, {torch.get_num_threads()} threads, "
          f"cached prefix {prefix}")
    # [MASK] rows run the adapter: a step with them and a plain one of the same length differ
    both = latency_profiles(rt.model, tokens, prefix, repeats)
    prof, plain = both[True], both[False]
    _print_profile(tokens, prof, plain)
    out = {"dtype": dtype, "weights": rt.weights, "compiled": rt.compiled, "packed": rt.model.packed, "kernels": rt.model.kernels_on,
           "threads": torch.get_num_threads(),
           "prefix": prefix, "latency_s": {str(k): v for k, v in prof.items()},
           "latency_plain_s": {str(k): v for k, v in plain.items()}}
    if choose:
        measured = calibrate(rt, block_sizes, lookup_ngram=lookup_ngram, lookup_tokens=lookup_tokens)
        out["choice"] = choose_operating_point(prof, measured, plain_profile=plain)
        _print_choice(out["choice"])
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {json_path}")
    return out


def _print_profile(tokens: Sequence[int], prof: dict[int, float], plain: dict[int, float]) -> None:
    print(f"{'new tokens':>10} {'ms':>9} {'x T=1':>7} {'ms/token':>9} {'no-mask ms':>11}")
    for t in tokens:
        print(f"{t:>10} {prof[t] * 1e3:>9.2f} {prof[t] / plain[tokens[0]]:>7.2f} {prof[t] * 1e3 / t:>9.2f} "
              f"{plain[t] * 1e3:>11.2f}", flush=True)


def _print_choice(choice: dict) -> None:
    print(f"{'b':>3} {'policy':>7} {'lookup':>6} {'tokens':>7} {'tok/fwd':>8} {'step ms':>8} "
          f"{'exp tok/s':>10} {'vs AR':>6}")
    for r in choice["candidates"]:
        print(f"{r['block_size']:>3} {r['policy']:>7} {r.get('lookup_tokens', 0):>6} "
              f"{r['tokens']:>7.1f} {r['tokens_per_forward']:>8.2f} "
              f"{r['step_s'] * 1e3:>8.2f} {r['expected_tokens_per_s']:>10.1f} {r['expected_speedup_vs_ar']:>6.2f}")
    best = choice["best"]
    print(f"chosen operating point: block_size={best['block_size']} policy={best['policy']} "
          f"lookup_tokens={best.get('lookup_tokens', 0)} "
          f"(offset acceptance {', '.join(f'{a:.2f}' for a in best['offset_acceptance'])})")
