"""Perplexity of each method's completions under a judge model, from a `tidar eval humaneval --json`
report (its `samples`): how far a decoding (e.g. beta < 1) moves the text away from what the judge,
by default the base AR model, finds likely. Greedy AR output is the judge's own choice, so it is the
floor, not a target; the measure shows the size of a departure, not its value.

    python benchmarks/judge_samples.py benchmarks/results/humaneval-beta-32.json [--judge smollm2]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from tidar.measure.prompts import humaneval_problems
from tidar.reproduce.evaluate import judge_nll
from tidar.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="a tidar eval humaneval --json report")
    p.add_argument("--judge", default="smollm2", help="judge model (default: smollm2, the base AR model)")
    p.add_argument("--json", default=None, help="write {method: {nll, ppl, tokens}} here")
    args = p.parse_args()
    report = json.load(open(args.report))
    prompts = {pr["task_id"]: pr["prompt"] for pr in humaneval_problems()}
    rt = Runtime.load(args.judge, dtype="float32", compile=False)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for s in report["samples"]:
        prompt = rt.encode(prompts[s["task_id"]])
        full = rt.encode(prompts[s["task_id"]] + s["completion"])
        nll, n = judge_nll(rt.model, prompt, full[len(prompt):]) if full[: len(prompt)] == prompt else (0.0, 0)
        sums[s["method"]][0] += nll
        sums[s["method"]][1] += n
    out = {m: {"nll": round(a / max(n, 1), 4), "ppl": round(math.exp(a / max(n, 1)), 3), "tokens": n}
           for m, (a, n) in sums.items()}
    for m, v in out.items():
        print(f"{m:32} judge ppl {v['ppl']:8.3f}  over {v['tokens']} completion tokens")
    if args.json:
        json.dump({"report": args.report, "judge": args.judge, "methods": out}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
