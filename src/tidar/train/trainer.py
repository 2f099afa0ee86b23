"""The trainer: one loop for the TiDAR objective and the AR / Block Diffusion baselines (see
`tidar.train.objectives`), with exact resume, on one process, DDP or FSDP2 (`tidar.train.distributed`).

A run resumes automatically when `out_dir` holds a checkpoint (`resume=True` makes that mandatory);
`stop_after` and `time_limit_min` end an invocation early with a checkpoint, so a long run can span
sessions. Resuming refuses a changed config except for the keys in `config.RESUME_FREE` (raising
max_steps is allowed and stretches the cosine schedule from that step on). Batches and block
diffusion noise are pure functions of (seed, step, rank) and every RNG is checkpointed, so a resumed
run logs and saves exactly what the straight run would have.

Out dir layout: `metrics.jsonl` (one JSON per train step and per eval), `config.json`,
`ckpt-<step>/{model/, trainer.pt}` + `latest` (the checkpoint to resume from), and `model/` at the
end of every invocation: a directory `tidar.model.weights.load_model` opens (adapter manifest or full
checkpoint). `tokens` in the metrics counts clean tokens (seq_len per sequence), for every objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tidar.model.transformer import Transformer
from tidar.train.checkpoint import Snapshot, atomic_text, restore_rng, save_checkpoint, save_model, seed_everything
from tidar.train.config import TrainConfig
from tidar.train.distributed import (
    Dist,
    all_mean,
    any_rank,
    barrier,
    device_for,
    dist_from_env,
    gather_state,
    load_optimizer_state,
    process_group,
    wrap,
)
from tidar.train.loader import batch_at
from tidar.train.objectives import ar_loss, autocast, block_diffusion_loss, noise_generator, tidar_loss
from tidar.train.prepare import Prepared, prepare
from tidar.train.validation import eval_line, evaluate

__all__ = ["lr_at", "train"]


@dataclass
class Run:
    """What one invocation trains with; fixed once set up."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model: Transformer  # unwrapped (FSDP shards it in place)
    net: nn.Module  # what forward and backward run through: a DDP wrapper, or the model
    opt: torch.optim.Optimizer
    trainable: list[nn.Parameter]
    train_tokens: np.ndarray
    val_tokens: np.ndarray | None  # None when eval_every = 0
    tokenizer: Any  # saved next to full checkpoints

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size * self.cfg.seq_len


@dataclass
class Progress:
    """Where the run stands; each step advances it."""

    step: int = 0
    tokens: int = 0
    steps_this_run: int = 0
    saved_at: int = -1  # the step of the last checkpoint written or resumed from
    started: float = 0.0  # perf_counter when this invocation's first step began
    last_train: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from lr down to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, resume: bool | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns the last train and eval metrics, the step, the out dir
    and the model. `resume`: None = when out_dir holds a checkpoint, True = it must, False = start over."""
    dist = dist_from_env()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device_for(cfg.device, dist)
    with process_group(dist, cfg.fsdp, device):
        run, progress = _start(cfg, prepare(cfg, resume), dist, device)
        _train_loop(run, progress)
        _save_final_model(run, progress)
    return {"train": progress.last_train, "eval": progress.last_eval, "step": progress.step,
            "out_dir": str(run.out_dir), "model": run.model}


# -- setting up ------------------------------------------------------------------------------------


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # norms, biases and the [MASK] vector are not decayed (standard; decaying them only hurts)
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps)


def _start(cfg: TrainConfig, prepared: Prepared, dist: Dist, device: torch.device) -> tuple[Run, Progress]:
    """The run on this device, wrapped for its parallelism, at its first step or its checkpoint's."""
    model = prepared.model.to(device)
    net = wrap(model, dist, cfg.fsdp, device)
    run = Run(cfg, dist, device, model, net, _optimizer(net, cfg), [p for p in net.parameters() if p.requires_grad],
              prepared.shards.split("train"), prepared.shards.split("val") if cfg.eval_every else None,
              prepared.tokenizer)
    progress = _restore(run, prepared.trainer_state)
    if dist.main:
        _open_log(run, progress.step, resumed=prepared.trainer_state is not None)
    return run, progress


def _restore(run: Run, state: dict[str, Any] | None) -> Progress:
    """A fresh start (every RNG seeded), or the checkpoint's step, optimizer and RNG states."""
    if state is None:
        seed_everything(run.cfg.seed)
        return Progress()
    load_optimizer_state(run.net, run.opt, state["optimizer"], run.cfg.fsdp)
    restore_rng(state["rng"])
    step = int(state["step"])
    return Progress(step=step, tokens=int(state["tokens"]), saved_at=step)


def _open_log(run: Run, step: int, resumed: bool) -> None:
    """metrics.jsonl, emptied or (resuming) cut back to `step`, and config.json."""
    path = run.metrics_path
    if resumed and path.exists():
        # Drop records past the checkpoint (a crash after it) so the log reads as one straight run.
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_text(path, "".join(ln + "\n" for ln in keep))
    elif not resumed:
        path.write_text("")
    atomic_text(run.out_dir / "config.json", json.dumps(run.cfg.to_dict(), indent=2) + "\n")


def _progress_bar(run: Run, step: int) -> Any:
    if not (run.dist.main and run.cfg.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=run.cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)  # redirected logs: fewer lines


# -- the loop --------------------------------------------------------------------------------------


def _train_loop(run: Run, progress: Progress) -> None:
    cfg = run.cfg
    if cfg.eval_every and cfg.eval_at_start and progress.step == 0:
        _evaluate(run, progress)
    bar = _progress_bar(run, progress.step)
    progress.started = time.perf_counter()
    run.net.train()
    while progress.step < cfg.max_steps:
        _train_step(run, progress)
        _report_step(run, progress, bar)
        stop = _should_stop(run, progress)
        if (cfg.save_every and progress.step % cfg.save_every == 0) or progress.step == cfg.max_steps or stop:
            _save_checkpoint(run, progress)
        if stop:
            break
    if bar is not None:
        bar.close()
    if progress.saved_at != progress.step:  # nothing to train (already at max_steps) still leaves a checkpoint
        _save_checkpoint(run, progress)


def _loss(net: nn.Module, x: torch.Tensor, cfg: TrainConfig, noise: torch.Generator | None) -> dict[str, torch.Tensor]:
    if cfg.objective == "tidar":
        return tidar_loss(net, x, cfg.block_size, cfg.alpha, cfg.targets)
    if cfg.objective == "ar":
        return ar_loss(net, x)
    return block_diffusion_loss(net, x, cfg.block_size, noise)


def _micro_step(run: Run, index: int, last: bool) -> dict[str, Any]:
    """Forward and backward of micro-batch `index`; its metrics, averaged over ranks."""
    cfg, dist = run.cfg, run.dist
    # batches and noise are a pure function of (seed, index, rank)
    x = batch_at(run.train_tokens, index, cfg.batch_size, cfg.seq_len, cfg.seed, dist.rank, dist.world_size)
    x = x.to(run.device)
    noise = noise_generator(cfg.seed, index, dist.rank) if cfg.objective == "block_diffusion" else None
    sync = last or not hasattr(run.net, "no_sync")  # DDP all-reduces the gradients once, on the last
    with contextlib.nullcontext() if sync else run.net.no_sync():
        with autocast(run.device, cfg.dtype):
            out = _loss(run.net, x, cfg, noise)
        (out["loss"] / cfg.grad_accum).backward()
    return _metrics_record(out, dist)


def _train_step(run: Run, progress: Progress) -> None:
    """One optimizer step over grad_accum micro-batches; its record becomes `progress.last_train`."""
    cfg = run.cfg
    t0 = time.perf_counter()
    lr = lr_at(progress.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
    for g in run.opt.param_groups:
        g["lr"] = lr
    records = [_micro_step(run, progress.step * cfg.grad_accum + micro, last=micro == cfg.grad_accum - 1)
               for micro in range(cfg.grad_accum)]
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip or float("inf"))  # DTensor-aware
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    progress.step += 1
    progress.steps_this_run += 1
    progress.tokens += run.tokens_per_step
    dt = time.perf_counter() - t0
    progress.last_train = {"kind": "train", "step": progress.step, "tokens": progress.tokens,
                           **_mean_records(records), "lr": lr, "grad_norm": float(grad_norm),
                           "tokens_per_s": run.tokens_per_step / dt, "elapsed_s": time.perf_counter() - progress.started}


def _report_step(run: Run, progress: Progress, bar: Any) -> None:
    """Log the step, show it, and evaluate when one is due."""
    rec = progress.last_train
    _log(run, rec)
    if bar is not None:
        bar.update(1)
        shown = {k: f"{rec[k]:.3f}" for k in ("loss", "ar_loss", "diff_loss") if k in rec}
        bar.set_postfix(**shown, tok_s=f"{rec['tokens_per_s']:.0f}")
    if not (run.cfg.eval_every and progress.step % run.cfg.eval_every == 0):
        return
    _evaluate(run, progress)
    line = f"{eval_line(progress.last_eval)} | train loss={rec['loss']:.3f} tok/s={rec['tokens_per_s']:.0f}"
    if bar is not None:
        bar.write(line)
    elif run.dist.main:
        print(line, flush=True)  # progress=false: still leave a readable log


def _should_stop(run: Run, progress: Progress) -> bool:
    """Whether stop_after or the time limit ends this invocation after this step."""
    cfg = run.cfg
    stop = bool(cfg.stop_after and progress.steps_this_run >= cfg.stop_after)
    stop |= bool(cfg.time_limit_min and time.perf_counter() - progress.started >= 60 * cfg.time_limit_min)
    if cfg.time_limit_min:
        # clocks differ between ranks: stop together or the others hang in the next all-reduce
        stop = any_rank(stop, run.dist, run.device)
    return stop


# -- records and saving ----------------------------------------------------------------------------


def _log(run: Run, record: dict[str, Any]) -> None:
    if run.dist.main:
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _evaluate(run: Run, progress: Progress) -> None:
    progress.last_eval = {"kind": "eval", "step": progress.step, "tokens": progress.tokens,
                          **evaluate(run.net, run.val_tokens, run.cfg, run.device)}
    _log(run, progress.last_eval)


def _metrics_record(out: dict[str, torch.Tensor], dist: Dist) -> dict[str, Any]:
    """Detached metrics averaged over ranks (one all-reduce), as JSON-ready floats/lists."""
    keys = [k for k in out if k != "loss"] + ["loss"]
    flat = [out[k].detach().float().reshape(-1) for k in keys]
    vec = all_mean(torch.cat(flat), dist).cpu()  # reduced where it lives: NCCL only reduces GPU tensors
    res: dict[str, Any] = {}
    i = 0
    for k, t in zip(keys, flat, strict=True):
        part = vec[i: i + t.numel()]
        res[k] = [round(float(a), 6) for a in part] if out[k].dim() else float(part[0])
        i += t.numel()
    return res


def _mean_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for k, v in records[0].items():
        if isinstance(v, list):
            res[k] = [round(sum(r[k][j] for r in records) / len(records), 6) for j in range(len(v))]
        else:
            res[k] = sum(r[k] for r in records) / len(records)
    return res


def _save_checkpoint(run: Run, progress: Progress) -> None:
    """Every rank gathers (FSDP), rank 0 writes, and all wait for it."""
    state, optim_state = gather_state(run.net, run.model, run.opt, run.cfg.fsdp)
    if run.dist.main:
        save_checkpoint(run.out_dir, progress.step, progress.tokens, Snapshot(run.model.config, state), optim_state,
                        run.cfg, run.dist.world_size, run.tokenizer)
    barrier(run.dist)
    progress.saved_at = progress.step


def _save_final_model(run: Run, progress: Progress) -> None:
    # The current model, loadable as is (also after a stop_after/time limit; its manifest or the
    # metrics say which step it is), so each session of a long run can be evaluated right away.
    state, _ = gather_state(run.net, run.model, run.opt, run.cfg.fsdp, optimizer=False)
    if run.dist.main:
        extra = {"step": progress.step, "tokens": progress.tokens, "finished": progress.step >= run.cfg.max_steps}
        save_model(Snapshot(run.model.config, state), run.out_dir / "model", run.cfg, extra, run.tokenizer)
