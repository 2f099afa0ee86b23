"""Which copy-draft policy commits the most tokens per forward? An exact offline simulation, no timing.

In greedy decoding a draft's fate depends only on AR's output: a step commits the longest prefix of
its draft that AR's output confirms, plus the bonus token. So, given AR's greedy outputs on the
HumanEval prompts (generated once and cached in `--outputs`), the forwards that a policy of
prompt-lookup and datastore drafts needs can be counted exactly without running the model. The
engine's own draft choice (its `DraftPolicy` over `LookupDrafter` and `DatastoreDrafter`, as a
`Decoder` builds them) is what runs for the engine's policies; the tree policies verify several
branches after the bonus token in one forward (shared prefixes once).
The trained diffusion block is left out: it commits under 1% of the accepted draft tokens once the
datastore is on, so `shipped` here is within 1% of the engine's measured tokens/forward.

Rows per forward is what verification costs. The estimated speedup prices each step by a measured
plain-forward latency per row count (`--latency`, measured on first use); it is a ranking aid, and
only a same-process A/B (`benchmarks/ab.py`) says what is faster.

    .venv/bin/python benchmarks/copy_policy_sim.py          # ~2 min; +7 min on first use (AR outputs)
    .venv/bin/python benchmarks/copy_policy_sim.py --limit 4   # the first 4 prompts only: a smoke test

Removed with the `lookup_occurrence` option (2026-12-06): the "latest occurrence" rows, and the
"lookup 16, latest, no datastore" row, which now runs with the only occurrence rule left (longest).
Their logged counts stay in results/copy-policy-sim.log; see docs/operating-point.md.
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections.abc import Callable
from pathlib import Path

from tidar.decode import Datastore, Decoder
from tidar.decode.drafters import Draft, DraftContext
from tidar.decode.drafters.lookup import LookupDrafter
from tidar.runtime import Runtime


def generate_outputs(rt: Runtime, path: Path) -> dict:
    from tidar.decode import generate
    from tidar.measure.prompts import load_prompts

    rows = []
    for p in load_prompts("humaneval", None, None):
        ids = rt.encode(p.text, chat=p.chat)
        out = generate(rt.model, [ids], rt.generation_config(max_new_tokens=128, mode="ar"))
        rows.append({"prompt": list(ids), "output": out.sequences[0]})
    data = {"model": rt.name, "dtype": "bfloat16", "mode": "ar", "max_new_tokens": 128, "prompts": rows}
    path.write_text(json.dumps(data) + "\n")
    return data


def measure_latency(rt: Runtime, path: Path, rows: list[int]) -> dict[int, float]:
    """Median seconds of a plain forward (no [MASK] rows) by number of rows, after a 300-token cache."""
    import torch

    from tidar.measure.profile import latency_profiles

    torch.set_num_threads(2)
    lat = latency_profiles(rt.model, rows, prefix=300, repeats=15, masks=(False,))[False]
    path.write_text(json.dumps({"prefix": 300, "threads": 2, "dtype": "bfloat16", "latency_plain_s": lat}) + "\n")
    return lat


def matched(draft: list[int], future: list[int]) -> int:
    m = 0
    while m < len(draft) and m < len(future) and draft[m] == future[m]:
        m += 1
    return m


def trie_rows(branches: list[list[int]]) -> int:
    """Rows a tree of these branches needs: shared prefixes are verified once."""
    return len({tuple(b[:i + 1]) for b in branches for i in range(len(b))})


class Engine:
    """The engine's copy drafts for one sequence: its history, and the draft policy a `Decoder` with
    these overrides builds (prompt lookup, else the datastore), asked as on a step without a
    [MASK] block, so no diffusion draft takes part."""

    def __init__(self, rt: Runtime, **overrides: object) -> None:
        self.policy = Decoder(rt.model, rt.generation_config(**overrides)).policy
        lookups = [d for d in self.policy.copies if isinstance(d, LookupDrafter)]
        if not lookups:
            raise SystemExit("error: the operating point has no prompt lookup (lookup_ngram 0)")
        self.lookup = lookups[0]
        self.ctx: list[int] = []

    def reset(self, ctx: list[int]) -> None:
        self.ctx = ctx
        self.policy.start([ctx])

    def extended(self, start: int) -> None:
        self.policy.extend(0, self.ctx, start)

    def propose(self) -> Draft:
        return self.policy.draft(0, DraftContext(self.ctx, None, 0))

    def draft(self) -> list[int]:
        return self.propose().tokens

    def occurrences(self) -> list[int]:
        n = self.lookup.n
        return self.lookup.index[0].get(tuple(self.ctx[-n:]), [])


Policy = Callable[[Engine], list[list[int]]]


def simulate(data: dict, engine: Engine, policy: Policy, latency: dict[int, float],
             after_prompt: Callable[[list[int]], None] | None = None) -> dict:
    steps = tokens = rows = 0
    cost = 0.0
    for row in data["prompts"]:
        out = row["output"]
        engine.reset(list(row["prompt"]) + out[:1])  # the prefill emits the first token
        t = 1
        while t < len(out):
            branches = [b for b in policy(engine) if b]
            m = max((matched(b, out[t:]) for b in branches), default=0)
            step = min(m + 1, len(out) - t)  # accepted drafts + the bonus token
            start = len(engine.ctx)
            engine.ctx.extend(out[t: t + step])
            engine.extended(start)
            t += step
            steps += 1
            tokens += step
            r = 1 + trie_rows(branches)
            rows += r
            cost += latency[min(r, max(latency))]
        if after_prompt is not None:
            after_prompt(out)
    # AR needs one 1-row forward per token
    return {"tokens_per_forward": tokens / steps, "rows_per_forward": rows / steps,
            "est_speedup": tokens * latency[1] / cost}


def show(name: str, r: dict) -> None:
    print(f"{name:<48} {r['tokens_per_forward']:.3f} tok/fwd  {r['rows_per_forward']:5.1f} rows/fwd  "
          f"est. {r['est_speedup']:.2f}x AR", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outputs", default="benchmarks/results/ar-humaneval-bf16.json",
                   help="AR greedy outputs on the 164 HumanEval prompts (generated and written here when missing)")
    p.add_argument("--latency", default="benchmarks/results/latency-plain-rows.json",
                   help="plain-forward latency by rows (measured and written here when missing)")
    p.add_argument("--limit", type=int, default=None, help="simulate the first N prompts only (default: all)")
    args = p.parse_args()
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    rt = Runtime.load(None, dtype="bfloat16")
    out_path, lat_path = Path(args.outputs), Path(args.latency)
    data = json.loads(out_path.read_text()) if out_path.exists() else generate_outputs(rt, out_path)
    data["prompts"] = data["prompts"][: args.limit]
    if lat_path.exists():
        latency = {int(k): v for k, v in json.loads(lat_path.read_text())["latency_plain_s"].items()}
    else:
        latency = measure_latency(rt, lat_path, list(range(1, 33)))
    ds = rt.datastore
    op = rt.operating_point
    print(f"{len(data['prompts'])} HumanEval prompts, {sum(len(r['output']) for r in data['prompts'])} AR tokens; "
          f"datastore {len(ds):,} tokens; shipped: lookup_tokens {op.get('lookup_tokens')}, "
          f"datastore_tokens {op.get('datastore_tokens')}")
    D = op.get("datastore_tokens", 4)

    def single(e: Engine) -> list[list[int]]:  # the engine's own choice: one draft
        return [e.draft()]

    print("-- the engine's policy (one draft per step)")
    for L in (6, 8, 10, 12, 16):  # the furthest-matching ("longest") occurrence is the engine's only rule
        show(f"lookup {L}, longest occurrence, datastore {D}",
             simulate(data, Engine(rt, lookup_tokens=L), single, latency))
    show("lookup 16, longest, no datastore",
         simulate(data, Engine(rt, lookup_tokens=16, datastore_tokens=0), single, latency))

    print("-- lookup spans that adapt: +up tokens after a fully accepted span, -down after a rejection")

    def adaptive(lo: int, hi: int, up: int, down: int) -> Policy:
        last: dict = {"draft": None, "start": 0}

        def pol(e: Engine) -> list[list[int]]:
            if last["draft"]:  # how the previous lookup span fared decides this one's length
                full = matched(last["draft"], e.ctx[last["start"]:]) >= len(last["draft"])
                n = e.lookup.max_tokens
                e.lookup.max_tokens = min(hi, n + up) if full else max(lo, n - down)
            d = e.propose()
            last.update(draft=d.tokens if d.source == "lookup" else None, start=len(e.ctx))
            return [d.tokens]
        return pol

    for lo, hi, up, down in ((8, 16, 4, 2), (8, 24, 8, 8), (8, 32, 8, 4), (6, 16, 4, 2)):
        show(f"lookup {lo}..{hi}, +{up} / -{down}", simulate(data, Engine(rt, lookup_tokens=lo), adaptive(lo, hi, up, down), latency))

    print("-- a datastore that grows with the outputs served so far (SuffixDecoding-style)")
    online: dict = {"ds": None, "seqs": []}

    def grow(out: list[int]) -> None:
        online["seqs"].append(out)
        online["ds"] = Datastore(online["seqs"], ds.vocab_size, ds.orders)

    def online_first(e: Engine) -> list[list[int]]:
        if e.occurrences() or online["ds"] is None:
            return [e.draft()]
        return [online["ds"].draft(e.ctx, D) or e.draft()]

    for L in (8, 16):
        online.update(ds=None, seqs=[])  # each run starts from an empty history
        show(f"lookup {L}, longest, earlier outputs first", simulate(data, Engine(rt, lookup_tokens=L), online_first,
                                                                     latency, after_prompt=grow))

    print("-- trees: several branches verified in one forward")

    def tree(e: Engine, lookup_k: int = 1, ds_k: int = 1, both: bool = False) -> list[list[int]]:
        """The engine's lookup draft and other occurrences' continuations (distinct first tokens),
        then, when there is none (or always, `both`), the datastore's top successors."""
        br = [e.draft()] if e.occurrences() else []
        L = e.lookup.max_tokens
        for j in reversed(e.occurrences()):
            if len(br) >= lookup_k:
                break
            c = e.ctx[j: j + L]
            if c and all(c[0] != b[0] for b in br):
                br.append(c)
        if not br or both:
            br += [c for c in ds.drafts(e.ctx, D, ds_k) if all(c[0] != b[0] for b in br)]
        return br

    def best_first(e: Engine, rows: int, prior: tuple[float, float] = (0.7, 0.85), fan: int = 3) -> list[list[int]]:
        """`rows` nodes, best estimated chance of being reached first: the lookup draft's tokens
        (prior[0], then * prior[1] per token) and datastore successors (the parent's chance * the
        successor's share of its n-gram's occurrences), expanded as they are added."""
        heap, n = [], 0
        p = prior[0]
        lookup = e.draft() if e.occurrences() else []
        for i in range(len(lookup)):
            heap.append((-p, n, tuple(lookup[:i + 1]), False))
            n += 1
            p *= prior[1]
        for tok, w in ds.successors(e.ctx, fan):
            heap.append((-w, n, (tok,), True))
            n += 1
        heapq.heapify(heap)
        nodes: set[tuple[int, ...]] = set()
        while heap and len(nodes) < rows:
            negp, _, path, expand = heapq.heappop(heap)
            if path in nodes:
                continue
            nodes.add(path)
            if expand:
                for tok, w in ds.successors(e.ctx + list(path), fan):
                    heapq.heappush(heap, (negp * w, n, (*path, tok), True))
                    n += 1
        return [list(x) for x in nodes]  # every node's path: the trie counts each once

    policies = {
        "datastore top-2": lambda e: tree(e, ds_k=2),
        "datastore top-3": lambda e: tree(e, ds_k=3),
        "lookup + datastore, both always": lambda e: tree(e, both=True),
        "lookup top-3 + datastore top-3": lambda e: tree(e, lookup_k=3, ds_k=3),
        "lookup top-3 + datastore top-3, both always": lambda e: tree(e, lookup_k=3, ds_k=3, both=True),
        "best-first, 8 rows": lambda e: best_first(e, 8),
        "best-first, 16 rows": lambda e: best_first(e, 16),
        "best-first, 24 rows": lambda e: best_first(e, 24),
    }
    for L in (8, 16):
        e = Engine(rt, lookup_tokens=L)
        for name, pol in policies.items():
            show(f"lookup {L}; {name}", simulate(data, e, pol, latency))


if __name__ == "__main__":
    main()
