"""The reproduction's measurements, every model in one process:

- AR-mode perplexity of each model on the whole val split (held-out stdlib files);
- decoding on held-out prompts with the real engine, interleaved per prompt so speed ratios compare:
  the TiDAR model in AR mode (the reference for `matches_ar` and speedups), the AR-continued model,
  TiDAR with diffusion drafts only by block size and beta, and block diffusion at its thresholds;
- the quality of what each method wrote: its perplexity under the shared pretrained checkpoint (a
  judge none of the three continuations is), and how often it reproduces the held-out text.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tidar.measure.bench import CpuMonitor, load_average, machine_info, run_bench
from tidar.measure.evaluate import perplexity
from tidar.measure.runners import BenchOptions, EngineRunner, Runner, build_runners
from tidar.reproduce.config import ReproduceConfig, ReproduceError
from tidar.runtime import Runtime
from tidar.train.loader import TokenShards

__all__ = ["evaluate_models", "held_out_prompts", "judge_nll"]


def held_out_prompts(val: np.ndarray, eos_id: int, count: int, prompt_tokens: int, new_tokens: int
                     ) -> list[tuple[list[int], list[int]]]:
    """(prompt, the text's own continuation) from the middle of evenly chosen val documents long
    enough for both, one per document."""
    need = prompt_tokens + new_tokens
    ends = np.flatnonzero(val == eos_id)
    starts = np.concatenate([[0], ends + 1])[: len(ends)]
    docs = [(int(s), int(e)) for s, e in zip(starts, ends, strict=True) if e - s >= need]
    if not docs:
        raise ReproduceError(f"no val document has {need} tokens; lower eval prompt_tokens/new_tokens")
    picks = [docs[i] for i in np.linspace(0, len(docs) - 1, min(count, len(docs))).round().astype(int)]
    out = []
    for s, e in dict.fromkeys(picks):
        o = s + (e - s - need) // 2
        out.append((val[o: o + prompt_tokens].tolist(), val[o + prompt_tokens: o + need].tolist()))
    return out


@torch.inference_mode()
def judge_nll(model: Any, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of `continuation` after `prompt` under `model`, and its length."""
    if not continuation:
        return 0.0, 0
    ids = torch.tensor([list(prompt) + list(continuation)])
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    logits = model(ids, torch.arange(n)[None], causal)[0, len(prompt) - 1: -1].float()
    return float(F.cross_entropy(logits, ids[0, len(prompt):], reduction="sum")), len(continuation)


def _runners(cfg: ReproduceConfig, rts: dict[str, Runtime]) -> dict[str, Runner]:
    """Every decoding run, named; "ar" (the TiDAR model in AR mode) is the reference."""
    ev = cfg.eval
    runners: dict[str, Runner] = {}
    if "tidar" in rts:
        runners["ar"] = EngineRunner(rts["tidar"], {"mode": "ar"})
        opts = BenchOptions(dtype=ev.dtype, block_sizes=tuple(ev.block_sizes), betas=tuple(ev.betas), warmup=0)
        runners.update(build_runners(rts["tidar"], ["tidar-diffusion"], opts))
    if "ar" in rts:
        runners["ar" if "tidar" not in rts else "ar-continued"] = EngineRunner(rts["ar"], {"mode": "ar"})
    if "block_diffusion" in rts:
        opts = BenchOptions(dtype=ev.dtype, thresholds=tuple(ev.thresholds), warmup=0,
                            engine={"block_size": rts["block_diffusion"].model.config.block_size})
        bd = build_runners(rts["block_diffusion"], ["diffusion"], opts)
        runners.update({("block-" + k if k.startswith("diffusion") else k): v for k, v in bd.items()})
    return runners


def _quality(judge: Any, pairs: Sequence[tuple[list[int], list[int]]], outputs: Sequence[list[int]]
             ) -> dict[str, float]:
    nll = count = same = 0.0
    for (prompt, ref), out in zip(pairs, outputs, strict=True):
        n, k = judge_nll(judge, prompt, out)
        nll, count = nll + n, count + k
        same += sum(a == b for a, b in zip(out, ref, strict=False))
    total = sum(len(ref) for _, ref in pairs)
    return {"judge_ppl": round(math.exp(nll / max(count, 1)), 3), "data_match": round(same / total, 4)}


def evaluate_models(cfg: ReproduceConfig, models: dict[str, Path], shards: Path, *, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Perplexities, the decoding table and sample quality of `models` (name -> model directory;
    names: pretrain and the objectives)."""
    ev = cfg.eval
    missing = [str(p) for p in models.values() if not p.is_dir()]
    if missing:
        raise ReproduceError(f"model directories missing: {', '.join(missing)}; run the training stages first")
    rts = {name: Runtime.load(str(path), dtype=ev.dtype, compile=False) for name, path in models.items()}
    sh = TokenShards(shards)
    val = sh.split("val")
    ppl = {}
    for name, rt in rts.items():
        ppl[name] = perplexity(rt.model, val, seq_len=ev.ppl_seq_len, batch_size=8)
        log(f"[evaluate] {name}: AR-mode val perplexity {ppl[name]['ppl']:.3f}")
    pairs = held_out_prompts(val, sh.eos_id, ev.prompts, ev.prompt_tokens, ev.new_tokens)
    runners = _runners(cfg, {k: v for k, v in rts.items() if k != "pretrain"})
    reference = rts["tidar"] if "tidar" in rts else next(iter(rts.values()))
    load_start, cpu = load_average(), CpuMonitor().start()
    result = run_bench(reference, [p for p, _ in pairs], list(runners), ev.new_tokens, runners=runners, warmup=1,
                       progress=progress)
    machine = {**machine_info(), "load_average_start": load_start, "load_average_end": load_average(),
               "other_cpu_share": cpu.stop()}
    judge = rts["pretrain"].model
    methods = {name: {**entry, **_quality(judge, pairs, result.outputs[name])} for name, entry in result.methods.items()}
    reference_quality = _quality(judge, pairs, [ref for _, ref in pairs])
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": machine, "dtype": ev.dtype,
            "prompts": len(pairs), "prompt_tokens": ev.prompt_tokens, "new_tokens": ev.new_tokens,
            "judge": "pretrain", "held_out_text": reference_quality, "perplexity": ppl, "methods": methods}
