"""What the sampling warp costs per verified row at SmolLM2's vocabulary (49,152), temperature 0.7 and
top_p 0.9: the old warp (a full sort of every row) against `tidar.decode.sampling.warp` (a top-k
candidate search, full sort only for the rows whose nucleus lies past the candidates), with the bare
temperature softmax as the floor. float32 logits, (rows, vocab) for rows 1, 4, 8, 16, 32; the
implementations run interleaved, order rotated per repeat; medians of --repeats. Run on an idle machine.

    .venv/bin/python benchmarks/warp_cost.py --repeats 50 --threads 2
    .venv/bin/python benchmarks/warp_cost.py --logits model --json benchmarks/results/warp-cost.json

`--logits peaked` (default) is synthetic: gaussian noise with a handful of boosted tokens per row,
so the nucleus is small, as for a trained LM; `flat` spreads the nucleus over most of the vocabulary
(every row falls back to the sort: the new warp's worst case); `model` takes real rows from
the shipped model's forward over a code prompt (or --model's). The table says what share of rows
the new warp sorted, and checks that both warps agree. The last two columns time a warp plus one
draw per row: over the vocabulary (`sample(warp(...))`, torch.multinomial's exponential race costs a
random number per token) and among the warp's candidates (`sample_candidates(warp_candidates(...))`,
what the decoder does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tidar.decode import sampling

ROWS = (1, 4, 8, 16, 32)
VOCAB = 49152
PROMPT = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]


def is_prime(k: int) -> bool:
    """Whether k is a prime number."""
'''


def old_warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The warp before the candidate search (top_p only, as benchmarked): sort every row."""
    logits = logits.float() / temperature
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= top_p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf")).softmax(-1)


def synthetic_logits(kind: str, rows: int, g: torch.Generator) -> torch.Tensor:
    if kind == "flat":
        return torch.randn(rows, VOCAB, generator=g) * 0.5
    logits = torch.randn(rows, VOCAB, generator=g)
    for r in range(rows):  # 1 to 20 likely tokens per row, 10 to 16 logits above the rest
        hot = torch.randint(0, VOCAB, (int(torch.randint(1, 21, (1,), generator=g)),), generator=g)
        logits[r, hot] += 10 + 6 * torch.rand(len(hot), generator=g)
    return logits


def model_logits(model: str | None, rows: int) -> torch.Tensor:
    from tidar.masks import causal_mask
    from tidar.runtime import Runtime

    rt = Runtime.load(model, dtype="float32")
    ids = torch.tensor([rt.encode(PROMPT)])
    n = ids.shape[1]
    if n < rows:
        raise SystemExit(f"the prompt has {n} tokens, fewer than {rows} rows")
    with torch.inference_mode():
        logits = rt.model(ids, torch.arange(n)[None], causal_mask(n), logits_index=torch.arange(n - rows, n))
    return logits.reshape(-1, logits.shape[-1])[-rows:].float()


def sorted_share(logits: torch.Tensor, temperature: float, top_p: float) -> float:
    """Share of rows the new warp sorts in full (one untimed call, counting its fallback's rows)."""
    counted: list[int] = []
    real = sampling._nucleus_by_sort
    sampling._nucleus_by_sort = lambda rows, p: counted.append(len(rows)) or real(rows, p)
    try:
        sampling.warp(logits, temperature, None, top_p)
    finally:
        sampling._nucleus_by_sort = real
    return sum(counted) / logits.shape[0]


def median_ms(logits: torch.Tensor, impls: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each implementation, interleaved, order rotated per repeat."""
    names = list(impls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        impls[n](logits)
    for i in range(repeats):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            impls[n](logits)
            times[n].append((time.perf_counter() - t0) * 1000)
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50, help="timed calls per implementation and row count")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--logits", choices=("peaked", "flat", "model"), default="peaked")
    p.add_argument("--model", default=None, help="with --logits model: model directory (default: the shipped one)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    real = model_logits(a.model, max(ROWS)) if a.logits == "model" else None
    impls = {"old": lambda x: old_warp(x, a.temperature, a.top_p),
             "new": lambda x: sampling.warp(x, a.temperature, None, a.top_p),
             "softmax": lambda x: (x.float() / a.temperature).softmax(-1),
             "draw_vocab": lambda x: sampling.sample(sampling.warp(x, a.temperature, None, a.top_p), g),
             "draw_cand": lambda x: sampling.sample_candidates(
                 sampling.warp_candidates(x, a.temperature, None, a.top_p), g)}
    results = []
    for rows in ROWS:
        logits = real[:rows].contiguous() if real is not None else synthetic_logits(a.logits, rows, g)
        old, new = old_warp(logits, a.temperature, a.top_p), sampling.warp(logits, a.temperature, None, a.top_p)
        ms = median_ms(logits, impls, a.repeats)
        results.append({"rows": rows, "old_ms": round(ms["old"], 4), "new_ms": round(ms["new"], 4),
                        "softmax_ms": round(ms["softmax"], 4), "draw_vocab_ms": round(ms["draw_vocab"], 4),
                        "draw_cand_ms": round(ms["draw_cand"], 4), "speedup": round(ms["old"] / ms["new"], 3),
                        "sorted_rows": round(sorted_share(logits, a.temperature, a.top_p), 3),
                        "max_abs_diff": float((old - new).abs().max()),
                        "same_support_rows": int(((old > 0) == (new > 0)).all(-1).sum())})
    print(f"warp, float32 (rows, {VOCAB}) {a.logits} logits, temperature {a.temperature}, top_p {a.top_p}, "
          f"{a.threads} threads, median of {a.repeats}, torch {torch.__version__}")
    print(f"{'rows':>5} {'old ms':>9} {'new ms':>9} {'speedup':>8} {'softmax ms':>11} {'sorted':>7} "
          f"{'max|diff|':>10} {'same support':>13} {'+draw V':>8} {'+draw cand':>10}")
    for r in results:
        print(f"{r['rows']:>5} {r['old_ms']:>9.3f} {r['new_ms']:>9.3f} {r['speedup']:>8.2f} {r['softmax_ms']:>11.3f} "
              f"{r['sorted_rows']:>7.0%} {r['max_abs_diff']:>10.1e} {r['same_support_rows']:>9}/{r['rows']} "
              f"{r['draw_vocab_ms']:>8.3f} {r['draw_cand_ms']:>10.3f}")
    if a.json:
        meta = {"vocab": VOCAB, "logits": a.logits, "model": a.model, "temperature": a.temperature, "top_p": a.top_p,
                "threads": a.threads, "repeats": a.repeats, "torch": torch.__version__,
                "candidates": sampling.CANDIDATES}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
