"""Training: the TiDAR objective, the AR and Block Diffusion baselines on the same code path, and a
small trainer with exact resume, DDP and optional FSDP2 sharding.

Usage (a JSON config plus `key=value` overrides; `--set key=value` is the same thing)::

    tidar train --config configs/smollm2-adapter-b4.json max_steps=200 lr=5e-4
    python -m tidar.train.trainer --config configs/tiny-tidar.json --dry-run     # validate, print, exit
    torchrun --standalone --nproc_per_node=2 -m tidar.train.trainer --config configs/tiny-tidar.json

Override values are parsed as JSON when they parse (`lr=1e-4`, `adapter_layers=[22,23]`,
`fsdp=true`) and taken as plain strings otherwise (`init=smollm2`). A run resumes automatically
when `out_dir` holds a checkpoint (`--resume` makes that mandatory); `stop_after` and
`time_limit_min` end an invocation early with a checkpoint, so a long run can span sessions.
Resuming refuses a changed config except for the keys in RESUME_FREE (raising max_steps is allowed
and stretches the cosine schedule from that step on). `fsdp=true` shards with FSDP2 (`fully_shard`,
which, unlike FSDP1, also runs on CPU/gloo); the default under torchrun is DDP.

Out dir layout: `metrics.jsonl` (one JSON per train step and per eval), `config.json`,
`ckpt-<step>/{model/, trainer.pt}` + `latest` (the checkpoint to resume from), and `model/` at the
end of every invocation: a directory `tidar.model.weights.load_model` opens (adapter manifest or full
checkpoint). `tokens` in the metrics counts clean tokens (seq_len per sequence), for every objective.
"""

from __future__ import annotations

import os

# libgomp reads this once when torch loads it; spin-waiting threads make a contended CPU ~36x slower
# (TIDAR.md §8). Only effective when this module is what first imports torch (`python -m`, the CLI).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tidar.masks import block_diffusion_training_mask, causal_mask, tidar_training_mask  # noqa: E402
from tidar.model.config import AdapterConfig, ConfigError, TidarConfig  # noqa: E402
from tidar.model.transformer import KVCache, Transformer  # noqa: E402

__all__ = [
    "TrainConfig",
    "TrainConfigError",
    "ar_loss",
    "block_diffusion_loss",
    "evaluate",
    "lr_at",
    "main",
    "tidar_loss",
    "train",
]

MODES = ("full", "adapter")
OBJECTIVES = ("tidar", "ar", "block_diffusion")
TARGETS = ("data", "self", "self-kl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_PREFIX = "ckpt-"


class TrainConfigError(ValueError):
    """A training setup that would fail or do something other than asked; raised before any work."""


# -- the objectives --------------------------------------------------------------------------------


def _core(model: nn.Module) -> Transformer:
    """The Transformer inside a DDP/FSDP wrapper (wrappers keep it as `.module`)."""
    return getattr(model, "module", model)


def _frozen_base(model: Transformer) -> bool:
    """Adapter mode: nothing outside the adapter trains, so the clean half needs no autograd."""
    trainable = {id(p) for p in model.adapter_parameters()}
    return model.has_adapter and not any(p.requires_grad for p in model.parameters() if id(p) not in trainable)


def _by_offset(hit: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of `hit` (B, n) per offset within the block of `positions` (n,): (block_size,)."""
    offsets = positions % block_size
    sums = torch.zeros(block_size, device=hit.device).index_add_(0, offsets, hit.float().sum(0))
    counts = torch.zeros(block_size, device=hit.device).index_add_(
        0, offsets, torch.full_like(offsets, hit.shape[0], dtype=torch.float))
    return sums / counts.clamp_min(1)


def self_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_teacher || q_student) over positions, from logits (..., V); the teacher gets no gradient.

    Computed as H(p, q) - H(p): soft-target cross-entropy has the written-out KL's gradient at ~80% of
    its cost (benchmarks/kl_loss_cost.py), and the entropy term, gradient-free, makes the value the KL.
    """
    p = F.softmax(teacher.detach(), dim=-1)
    return F.cross_entropy(student.flatten(0, -2), p.flatten(0, -2)) - torch.special.entr(p).sum(-1).mean()


def tidar_loss(model: nn.Module, x: torch.Tensor, block_size: int, alpha: float = 1.0,
               targets: str = "data", cached_clean: bool | None = None) -> dict[str, torch.Tensor]:
    """TiDAR loss on clean tokens x (B, L): the input is [x | L x MASK] under `tidar_training_mask`.

    AR loss: clean position i predicts x_{i+1}. Diffusion loss: mask position i predicts its target
    (no shift): x_i for targets='data'; for 'self' the AR model's own argmax for position i (the
    clean logits at i-1), for 'self-kl' KL(p_AR || p_diff) to those detached logits. Position 0 has
    no AR prediction and is skipped by the 'self' targets. total = (alpha*AR + diff) / (1 + alpha).

    `cached_clean` (default: when the base is frozen) computes the clean half without autograd into
    a KV cache and forwards only the L mask tokens on top of it: same losses, half the backward.

    Returns `loss` (with grad) and detached metrics: `ar_loss`, `diff_loss`, `ar_acc`, `acc_data`
    and `acc_ar` (block_size,) = draft accuracy by offset vs the data token and vs the AR argmax
    (what acceptance is judged against), and `accept_est`, the mean tokens a pass would commit under
    teacher forcing (1 + leading offsets >= 1 whose draft equals the AR argmax; block 0 skipped).
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    core = _core(model)
    cfg = core.config
    B, L = x.shape
    attn, pos = tidar_training_mask(L, block_size, x.device)  # (2L, 2L), (2L,)
    masks = torch.full_like(x, cfg.mask_token_id)
    if cached_clean is None:
        cached_clean = _frozen_base(core)
    if cached_clean:
        # The clean half never attends to mask tokens, so it is exactly a causal pass over x: run it
        # without a graph, keep its K/V, then run the mask half against that cache.
        dtype = next(core.parameters()).dtype
        cache = KVCache(cfg, B, 2 * L, dtype, device=x.device)
        with torch.no_grad():
            clean_logits = model(x, pos[None, :L], attn[None, None, :L, :L], cache=cache, offset=0)
        mask_logits = model(masks, pos[None, L:], attn[None, None, L:, :], cache=cache, offset=L)
    else:
        logits = model(torch.cat([x, masks], dim=1), pos[None], attn[None, None])  # (B, 2L, V)
        clean_logits, mask_logits = logits[:, :L], logits[:, L:]

    ar_logits = clean_logits[:, :-1].float()  # (B, L-1): predictions for positions 1..L-1
    ar = F.cross_entropy(ar_logits.flatten(0, 1), x[:, 1:].flatten())
    ar_pred = ar_logits.detach().argmax(-1)  # (B, L-1)
    mask_logits = mask_logits.float()
    if targets == "data":
        diff = F.cross_entropy(mask_logits.flatten(0, 1), x.flatten())
    elif targets == "self":
        diff = F.cross_entropy(mask_logits[:, 1:].flatten(0, 1), ar_pred.flatten())
    else:
        diff = self_kl(mask_logits[:, 1:], ar_logits.detach())
    loss = (alpha * ar + diff) / (1 + alpha)

    with torch.no_grad():
        draft = mask_logits.argmax(-1)  # (B, L)
        positions = torch.arange(L, device=x.device)
        hit_ar = draft[:, 1:] == ar_pred  # (B, L-1), positions 1..L-1
        out = {
            "loss": loss,
            "ar_loss": ar.detach(),
            "diff_loss": diff.detach(),
            "ar_acc": (ar_pred == x[:, 1:]).float().mean(),
            "acc_data": _by_offset(draft == x, positions, block_size),
            "acc_ar": _by_offset(hit_ar, positions[1:], block_size),
        }
        n_blocks = L // block_size
        if n_blocks > 1:
            # (B, n_blocks-1, b): offsets of blocks 1.. (block 0 has no AR prediction at offset 0)
            blocks = torch.cat([hit_ar.new_ones(B, 1), hit_ar], dim=1).view(B, n_blocks, block_size)[:, 1:]
            # offset 0 is always committed (it is the AR token); then the run of matches from offset 1
            run = blocks[..., 1:].long().cumprod(-1).sum(-1)
            out["accept_est"] = (1 + run).float().mean()
    return out


def ar_loss(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain causal LM loss over x (B, L): the AR baseline, and how any model is scored in AR mode."""
    L = x.shape[1]
    logits = model(x, torch.arange(L, device=x.device)[None], causal_mask(L, x.device)[None, None])
    ar_logits = logits[:, :-1].float()
    loss = F.cross_entropy(ar_logits.flatten(0, 1), x[:, 1:].flatten())
    return {"loss": loss, "ar_loss": loss.detach(),
            "ar_acc": (ar_logits.detach().argmax(-1) == x[:, 1:]).float().mean()}


def block_diffusion_loss(model: nn.Module, x: torch.Tensor, block_size: int,
                         generator: torch.Generator | None = None, full_mask: bool = False) -> dict[str, torch.Tensor]:
    """BD3-LM style baseline: [x | x_t] under `block_diffusion_training_mask`, where each block of the
    noisy copy draws a masking ratio t ~ U(0, 1] and masks each token with probability t (all of
    them when `full_mask`, i.e. one-step drafting). Loss: plain mean CE over masked positions; the
    clean copy gets no loss. `acc_data` (block_size,) is the accuracy at masked positions by offset.
    """
    core = _core(model)
    B, L = x.shape
    attn, pos = block_diffusion_training_mask(L, block_size, x.device)
    if full_mask:
        masked = torch.ones_like(x, dtype=torch.bool)
    else:
        # Drawn on the CPU from an explicit generator, so the noise is a pure function of the step.
        t = 1.0 - torch.rand(B, L // block_size, 1, generator=generator)  # (0, 1]
        masked = (torch.rand(B, L // block_size, block_size, generator=generator) < t).view(B, L).to(x.device)
        if not masked.any():
            # Keep [MASK] in the graph (DDP expects a gradient for every trainable parameter).
            masked[0, 0] = True
    noisy = x.masked_fill(masked, core.config.mask_token_id)
    logits = model(torch.cat([x, noisy], dim=1), pos[None], attn[None, None])[:, L:].float()  # (B, L, V)
    loss = F.cross_entropy(logits[masked], x[masked])
    with torch.no_grad():
        hit = (logits.argmax(-1) == x).float()
        offsets = torch.arange(L, device=x.device) % block_size
        sums = torch.zeros(block_size, device=x.device).index_add_(0, offsets, (hit * masked).sum(0))
        counts = torch.zeros(block_size, device=x.device).index_add_(0, offsets, masked.float().sum(0))
    return {"loss": loss, "diff_loss": loss.detach(), "acc_data": sums / counts.clamp_min(1)}


# -- configuration ---------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a run needs; loaded from JSON + `key=value` overrides (see the module docstring)."""

    # model
    init: str = "smollm2"  # 'smollm2' | checkpoint or adapter dir | 'scratch:{TidarConfig kwargs as JSON}'
    mode: str = "adapter"  # 'full': train every weight | 'adapter': frozen base + LoRA at [MASK] rows
    objective: str = "tidar"  # 'tidar' | 'ar' | 'block_diffusion'
    targets: str = "data"  # diffusion targets: 'data' | 'self' (AR argmax) | 'self-kl' (AR distribution)
    block_size: int = 4
    alpha: float = 1.0  # AR loss weight: (alpha*AR + diff) / (1 + alpha)
    adapter_rank: int = 32
    adapter_alpha: float = 64.0
    adapter_targets: list[str] | str = "all"  # 'all' or a list of HF Llama linear names
    adapter_layers: list[int] | None = None  # None = all layers; negative indices count from the end
    tokenizer: str | None = "smollm2"  # saved next to full checkpoints; None = save none
    # data
    data: str = "data/shards"
    seq_len: int = 256
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1  # global batch = batch_size * grad_accum * world_size sequences
    # optimisation
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    max_steps: int = 1000
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    dtype: str = "float32"  # 'float32' | 'bfloat16' (autocast; master weights stay float32)
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    fsdp: bool = False
    # bookkeeping
    eval_every: int = 100  # 0 = never (then the val split may be empty)
    eval_batches: int = 8
    eval_at_start: bool = True
    save_every: int = 200  # 0 = only at the end
    keep_checkpoints: int = 1
    stop_after: int = 0  # end this invocation (with a checkpoint) after this many steps; 0 = off
    time_limit_min: float = 0.0  # same, after this many minutes; 0 = off
    out_dir: str = "runs/tidar"
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    progress: bool = True

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(values) - set(cls.valid_keys()))
        if unknown:
            raise TrainConfigError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(cls.valid_keys())}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
        """A JSON file (optional) plus `key=value` overrides (JSON values, or plain strings)."""
        values: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise TrainConfigError(f"config file {p} not found")
            try:
                values = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise TrainConfigError(f"{p} is not valid JSON: {e}") from None
            if not isinstance(values, dict):
                raise TrainConfigError(f"{p} must hold a JSON object")
            values.pop("_comment", None)
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise TrainConfigError(f"override {item!r} is not key=value")
            try:
                values[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                values[key.strip()] = raw
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a value against its field's annotation; ints are accepted for floats, 1e3 for ints."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if typing.get_origin(opt) is list and isinstance(value, (list, tuple)):
            (elem,) = typing.get_args(opt)
            if all(isinstance(v, elem) and not isinstance(v, bool) for v in value):
                return list(value)
    want = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise TrainConfigError(f"config key {key!r}: expected {want}, got {value!r}")


# -- setup: validation, model, data ---------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_from_env() -> _Dist:
    # torchrun sets these; a plain `python` run has none. A stray RANK (a common shell variable name)
    # would make this process a non-main rank that trains but writes nothing, so it is checked.
    try:
        d = _Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                  int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise TrainConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None
    if not (d.world_size >= 1 and 0 <= d.rank < d.world_size and d.local_rank >= 0):
        raise TrainConfigError(
            f"environment RANK={d.rank}, WORLD_SIZE={d.world_size}: these are torch.distributed's launch "
            "variables (torchrun sets them); unset RANK for a single-process run, or launch with torchrun")
    return d


def _check_config(cfg: TrainConfig) -> list[str]:
    """Every check that needs neither the model nor the data, as a list of problems."""
    errs = []
    if cfg.mode not in MODES:
        errs.append(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.objective not in OBJECTIVES:
        errs.append(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    if cfg.targets not in TARGETS:
        errs.append(f"targets must be one of {TARGETS}, got {cfg.targets!r}")
    elif cfg.targets != "data" and cfg.objective != "tidar":
        errs.append(f"targets={cfg.targets!r} (self-distillation) needs objective 'tidar'")
    if cfg.mode == "adapter" and cfg.objective == "ar":
        errs.append("objective 'ar' with mode 'adapter' trains nothing: the adapter acts only at [MASK] "
                    "positions; use mode 'full'")
    if cfg.mode == "adapter" and cfg.init.startswith("scratch:"):
        errs.append("mode 'adapter' needs a pretrained base (init 'smollm2' or a checkpoint dir), not scratch")
    if cfg.block_size < 1:
        errs.append(f"block_size must be >= 1, got {cfg.block_size}")
    elif cfg.seq_len < 2 or cfg.seq_len % cfg.block_size:
        errs.append(f"block_size ({cfg.block_size}) must divide seq_len ({cfg.seq_len}), and seq_len must be >= 2")
    for k in ("batch_size", "grad_accum", "max_steps", "adapter_rank", "keep_checkpoints"):
        if getattr(cfg, k) < 1:
            errs.append(f"{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("warmup_steps", "eval_every", "eval_batches", "save_every", "stop_after", "threads", "seed",
              "weight_decay", "grad_clip", "time_limit_min", "alpha"):
        if getattr(cfg, k) < 0:
            errs.append(f"{k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.eval_every and cfg.eval_batches < 1:
        errs.append("eval_batches must be >= 1 when eval_every > 0")
    if not 0 < cfg.lr:
        errs.append(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.min_lr <= cfg.lr:
        errs.append(f"min_lr must be in [0, lr={cfg.lr}], got {cfg.min_lr}")
    if cfg.dtype not in DTYPES:
        errs.append(f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        errs.append(f"device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}")
    elif cfg.device == "cuda" and not torch.cuda.is_available():
        errs.append("device 'cuda' requested but torch sees no GPU")
    if isinstance(cfg.adapter_targets, str) and cfg.adapter_targets != "all":
        errs.append(f"adapter_targets must be 'all' or a list of {LINEAR_NAMES}, got {cfg.adapter_targets!r}")
    elif isinstance(cfg.adapter_targets, list):
        bad = [t for t in cfg.adapter_targets if t not in LINEAR_NAMES]
        if bad or not cfg.adapter_targets:
            errs.append(f"adapter_targets {bad or '[]'} invalid; choose from {LINEAR_NAMES}")
    if cfg.init.startswith("scratch:"):
        try:
            kw = json.loads(cfg.init[len("scratch:"):])
            if not isinstance(kw, dict):
                raise ValueError("not a JSON object")
            TidarConfig(**kw)
        except (ValueError, TypeError) as e:
            errs.append(f"init 'scratch:...' must be 'scratch:' + a JSON object of TidarConfig fields ({e})")
    elif cfg.init not in ("smollm2", "base", "smollm2-135m-instruct") and not Path(cfg.init).exists():
        errs.append(f"init {cfg.init!r} is neither 'smollm2', 'scratch:{{...}}' nor an existing model directory")
    return errs


def _check_out_dir(out_dir: Path) -> str | None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return f"out_dir {out_dir} is not writable ({e})"
    return None


def _check_data(cfg: TrainConfig) -> tuple[list[str], Any]:
    from tidar.train.data import DataError, TokenShards

    try:
        shards = TokenShards(cfg.data)
    except (DataError, OSError) as e:
        return [f"data: {e}"], None
    errs = []
    if shards.tokens("train") < cfg.seq_len + 1:
        errs.append(f"data: train split of {cfg.data} has {shards.tokens('train')} tokens, fewer than "
                    f"seq_len+1 = {cfg.seq_len + 1}")
    if cfg.eval_every and shards.tokens("val") < cfg.seq_len + 1:
        errs.append(f"data: val split of {cfg.data} has {shards.tokens('val')} tokens, fewer than "
                    f"seq_len+1 = {cfg.seq_len + 1}; rebuild with a val split or set eval_every=0")
    return errs, shards


def _adapter_config(cfg: TrainConfig, n_layers: int) -> AdapterConfig:
    targets = LINEAR_NAMES if cfg.adapter_targets == "all" else tuple(cfg.adapter_targets)
    layers = None
    if cfg.adapter_layers is not None:
        layers = tuple(sorted({i % n_layers for i in cfg.adapter_layers}))
    return AdapterConfig(rank=cfg.adapter_rank, alpha=cfg.adapter_alpha, targets=targets, layers=layers)


def _base_name(init: str) -> str:
    """What an adapter manifest should name as its base: loadable from any working directory."""
    if init in ("smollm2", "base", "smollm2-135m-instruct"):
        return "smollm2"
    from tidar.model.weights import read_manifest

    path = Path(init).resolve()
    manifest = read_manifest(path)
    if manifest is not None:  # continuing an adapter: its base, not the adapter itself
        return manifest.get("base", "smollm2")
    return str(path)


def _build_model(cfg: TrainConfig, checkpoint: Path | None) -> Transformer:
    """The model in float32 with requires_grad set for the mode; from the checkpoint when resuming."""
    from tidar.model.weights import load_model

    torch.manual_seed(cfg.seed)  # the adapter's LoRA A init draws from the global RNG
    if checkpoint is not None:
        model = load_model(checkpoint / "model")
    elif cfg.init.startswith("scratch:"):
        model = Transformer(TidarConfig(**json.loads(cfg.init[len("scratch:"):]))).init_weights(std=0.02, seed=cfg.seed)
    else:
        model = load_model(cfg.init)
    n_layers = model.config.num_hidden_layers
    if cfg.adapter_layers is not None:
        bad = [i for i in cfg.adapter_layers if not -n_layers <= i < n_layers]
        if bad:
            raise TrainConfigError(f"adapter_layers {bad} out of range for a {n_layers}-layer model")
    if cfg.mode == "adapter":
        want = _adapter_config(cfg, n_layers)
        if model.has_adapter:
            have = model.config.adapter
            if checkpoint is None and want.rank > have.rank and (tuple(have.targets), have.layers) == (
                    want.targets, want.layers):
                # a wider adapter continues from the narrower one's function (capacity experiments)
                model.grow_adapter(want.rank, want.alpha)
            elif (have.rank, have.alpha, tuple(have.targets), have.layers) != (want.rank, want.alpha, want.targets,
                                                                                 want.layers):
                raise TrainConfigError(
                    f"init {cfg.init} already has an adapter (rank {have.rank}, alpha {have.alpha}, targets "
                    f"{list(have.targets)}, layers {have.layers}) that differs from the config's; match them "
                    "(or raise only adapter_rank: the adapter is then widened)")
        else:
            model.add_adapter(want)
    elif model.has_adapter:
        raise TrainConfigError(f"mode 'full' needs a model without an adapter, but {cfg.init} has one")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise TrainConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                               f"{model.config.max_position_embeddings}")
    model.config.block_size = cfg.block_size
    model.float().train()
    trainable = set(map(id, model.adapter_parameters())) if cfg.mode == "adapter" else set(map(id, model.parameters()))
    if cfg.objective == "ar":
        trainable.discard(id(model.mask_embed))  # never used without [MASK] tokens (DDP wants every grad)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from lr down to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # norms, biases and the [MASK] vector are not decayed (standard; decaying them only hurts)
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.adam_eps)


def _noise_generator(seed: int, index: int, rank: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, index, rank, 0xB1D]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _step_loss(net: nn.Module, x: torch.Tensor, cfg: TrainConfig, noise: torch.Generator | None,
               eval_mode: bool = False) -> dict[str, torch.Tensor]:
    if cfg.objective == "tidar":
        return tidar_loss(net, x, cfg.block_size, cfg.alpha, "data" if eval_mode else cfg.targets)
    if cfg.objective == "ar":
        return ar_loss(net, x)
    return block_diffusion_loss(net, x, cfg.block_size, noise)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, cfg: TrainConfig, device: torch.device | str = "cpu"
             ) -> dict[str, Any]:
    """Validation metrics over `eval_batches` fixed batches of the val split (the same every time).

    Always: `val_ar_loss` and `val_ppl` (AR mode). TiDAR: `val_diff_loss` vs data tokens, draft
    accuracy by offset vs data (`val_acc_data`) and vs the AR argmax (`val_acc_ar`), `val_accept_est`.
    Block diffusion: `val_diff_loss` at random ratios (fixed noise) and one-step full-mask accuracy.
    """
    from tidar.train.data import val_batches

    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums: dict[str, Any] = {}
    n = 0
    for i, x in enumerate(val_batches(tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches)):
        x = x.to(device)
        with _autocast(device, cfg.dtype):
            if cfg.objective == "tidar":
                out = tidar_loss(model, x, cfg.block_size, cfg.alpha, "data")
                out = {"val_loss": out["loss"], "val_ar_loss": out["ar_loss"], "val_diff_loss": out["diff_loss"],
                       "val_ar_acc": out["ar_acc"], "val_acc_data": out["acc_data"], "val_acc_ar": out["acc_ar"],
                       "val_accept_est": out["accept_est"]}
            else:
                ar = ar_loss(model, x)
                out = {"val_ar_loss": ar["ar_loss"], "val_ar_acc": ar["ar_acc"]}
                if cfg.objective == "block_diffusion":
                    bd = block_diffusion_loss(model, x, cfg.block_size, _noise_generator(cfg.seed, i, 1 << 20))
                    full = block_diffusion_loss(model, x, cfg.block_size, full_mask=True)
                    out.update(val_loss=bd["loss"], val_diff_loss=bd["diff_loss"], val_acc_data=full["acc_data"])
                else:
                    out["val_loss"] = ar["ar_loss"]
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.double().cpu() * x.shape[0]
        n += x.shape[0]
    model.train(was_training)
    res: dict[str, Any] = {}
    for k, v in sums.items():
        v = v / max(n, 1)
        res[k] = [round(float(a), 6) for a in v] if v.dim() else float(v)
    if "val_ar_loss" in res:
        res["val_ppl"] = math.exp(min(res["val_ar_loss"], 50.0))
    return res


# -- checkpoints -----------------------------------------------------------------------------------


class _Snapshot:
    """Duck-types the bits of a Transformer that weights.save_pretrained/save_adapter read, so a
    gathered (FSDP) state dict saves through the same code as a plain model."""

    def __init__(self, config: TidarConfig, state: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._state.items())


def _latest_checkpoint(out_dir: Path) -> Path | None:
    latest = out_dir / "latest"
    if not latest.is_file():
        return None
    path = out_dir / latest.read_text().strip()
    if not (path / "trainer.pt").is_file():
        raise TrainConfigError(f"{latest} points to {path}, which is not a complete checkpoint; remove {latest} "
                               "to start over")
    return path


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_model(snapshot: _Snapshot, directory: Path, cfg: TrainConfig, extra: dict[str, Any],
                tokenizer: Any) -> None:
    from tidar.model.weights import save_adapter, save_pretrained

    if cfg.mode == "adapter":
        manifest = {"base": _base_name(cfg.init), "objective": cfg.objective, "targets": cfg.targets, **extra}
        save_adapter(snapshot, directory, manifest)  # type: ignore[arg-type]
    else:
        save_pretrained(snapshot, directory, tokenizer=tokenizer)  # type: ignore[arg-type]


def _save_checkpoint(out_dir: Path, step: int, tokens: int, snapshot: _Snapshot, optim_state: dict[str, Any],
                     cfg: TrainConfig, dist_: _Dist, tokenizer: Any) -> Path:
    """ckpt-<step>/ written under a temporary name and renamed into place, then `latest` is switched
    atomically: a crash at any point leaves the previous checkpoint usable."""
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_model(snapshot, tmp / "model", cfg, {"step": step, "tokens": tokens}, tokenizer)
    state = {
        "step": step,
        "tokens": tokens,
        "optimizer": optim_state,
        "scheduler": {"kind": "warmup_cosine", "step": step},  # the lr is a pure function of step
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "config": cfg.to_dict(),
        "world_size": dist_.world_size,
    }
    torch.save(state, tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_text(out_dir / "latest", name + "\n")
    old = sorted(p for p in out_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name != name)
    for p in old[: max(0, len(old) - (cfg.keep_checkpoints - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


# Keys that may change between a run and its resumption; anything else would silently change the run.
RESUME_FREE = frozenset({"max_steps", "stop_after", "time_limit_min", "eval_every", "eval_batches", "eval_at_start",
                         "save_every", "keep_checkpoints", "threads", "progress", "data", "out_dir", "device",
                         "tokenizer"})


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    # keys the checkpoint lacks are newer than it: their defaults reproduce the old behaviour
    diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k not in RESUME_FREE and k in saved and saved[k] != now[k]]
    if diff:
        raise TrainConfigError(f"checkpoint {path} was made with a different config ({'; '.join(diff)}); "
                               "use another out_dir, or remove the checkpoint to start over")


# -- the trainer -----------------------------------------------------------------------------------


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _reduce_metrics(out: dict[str, torch.Tensor], dist_: _Dist) -> dict[str, Any]:
    """Detached metrics averaged over ranks (one all-reduce), as JSON-ready floats/lists."""
    keys = [k for k in out if k != "loss"] + ["loss"]
    flat = [out[k].detach().float().reshape(-1) for k in keys]
    vec = torch.cat(flat)  # stays on the device until reduced: NCCL only reduces GPU tensors
    if dist_.enabled:
        import torch.distributed as dist

        dist.all_reduce(vec)
        vec /= dist_.world_size
    vec = vec.cpu()
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


def prepare(cfg: TrainConfig, resume: bool | None = None) -> dict[str, Any]:
    """Validate everything a run needs (config, data, out_dir, model) and load it; raises
    TrainConfigError with every problem found. `resume`: None = when a checkpoint exists."""
    errs = _check_config(cfg)
    out_dir = Path(cfg.out_dir)
    shards = None
    if not errs:
        data_errs, shards = _check_data(cfg)
        errs += data_errs
        bad_dir = _check_out_dir(out_dir)
        if bad_dir:
            errs.append(bad_dir)
    if errs:
        raise TrainConfigError("invalid training setup:\n  - " + "\n  - ".join(errs))
    checkpoint = _latest_checkpoint(out_dir)
    if resume and checkpoint is None:
        raise TrainConfigError(f"--resume given but {out_dir} holds no checkpoint")
    if resume is False:
        checkpoint = None
    trainer_state = None
    if checkpoint is not None:
        trainer_state = torch.load(checkpoint / "trainer.pt", weights_only=False)  # our own file
        _check_resume(trainer_state["config"], cfg, checkpoint)
    try:
        model = _build_model(cfg, checkpoint)
    except ConfigError as e:
        raise TrainConfigError(f"model: {e}") from None
    if shards.vocab_size > model.config.vocab_size:
        raise TrainConfigError(f"data vocabulary ({shards.vocab_size}) is larger than the model's "
                               f"({model.config.vocab_size}): shards were built with another tokenizer")
    tokenizer = None
    if cfg.mode == "full" and cfg.tokenizer:
        from tidar.model.weights import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    return {"model": model, "shards": shards, "checkpoint": checkpoint, "trainer_state": trainer_state,
            "tokenizer": tokenizer}


def train(cfg: TrainConfig, resume: bool | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns the last train and eval metrics and the out dir."""
    from tidar.train.data import batch_at

    dist_ = _dist_from_env()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{dist_.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    import torch.distributed as dist

    own_group = (dist_.enabled or cfg.fsdp) and not dist.is_initialized()
    if own_group:
        if not dist_.enabled:  # FSDP needs a process group even for one process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=dist_.rank, world_size=dist_.world_size)
    try:
        return _train(cfg, resume, dist_, device, batch_at)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool | None, dist_: _Dist, device: torch.device, batch_at: Any
           ) -> dict[str, Any]:
    setup = prepare(cfg, resume)
    model: Transformer = setup["model"].to(device)
    shards, state, tokenizer = setup["shards"], setup["trainer_state"], setup["tokenizer"]
    out_dir = Path(cfg.out_dir)
    train_tokens = shards.split("train")
    val_tokens = shards.split("val") if cfg.eval_every else None

    net: nn.Module = model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        # FSDP2 (per-parameter sharding): unlike FSDP1 it runs on CPU (gloo) too, and frozen and
        # trainable weights may share a layer (adapter mode). One unit per block, plus the root.
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif dist_.enabled:
        # broadcast_buffers off: the only buffers are RoPE tables, identical everywhere
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False, find_unused_parameters=False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = _optimizer(net, cfg)

    step, tokens = 0, 0
    if state is not None:
        step, tokens = int(state["step"]), int(state["tokens"])
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(net, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)

    metrics_path = out_dir / "metrics.jsonl"
    if dist_.main:
        # Drop records past the checkpoint (a crash after it) so the log reads as one straight run.
        if state is not None and metrics_path.exists():
            keep = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
            _atomic_text(metrics_path, "".join(ln + "\n" for ln in keep))
        elif state is None:
            metrics_path.write_text("")
        _atomic_text(out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    def log(record: dict[str, Any]) -> None:
        if dist_.main:
            _append_jsonl(metrics_path, record)

    def run_eval() -> dict[str, Any]:
        res = {"kind": "eval", "step": step, "tokens": tokens, **evaluate(net, val_tokens, cfg, device)}
        log(res)
        return res

    def save() -> None:
        snap_state, osd = _gather_state(net, model, opt, cfg)
        if dist_.main:
            _save_checkpoint(out_dir, step, tokens, _Snapshot(model.config, snap_state), osd, cfg, dist_, tokenizer)
        if dist_.enabled:
            import torch.distributed as dist

            dist.barrier()

    tokens_per_step = cfg.batch_size * cfg.grad_accum * dist_.world_size * cfg.seq_len
    last_eval: dict[str, Any] = {}
    last_train: dict[str, Any] = {}
    if cfg.eval_every and cfg.eval_at_start and step == 0:
        last_eval = run_eval()
    bar = None
    if dist_.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)  # redirected logs: fewer lines
    started = time.perf_counter()
    steps_this_run = 0
    saved_at = step if state is not None else -1
    net.train()
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        records = []
        for micro in range(cfg.grad_accum):
            index = step * cfg.grad_accum + micro  # batches are a pure function of (seed, index, rank)
            x = batch_at(train_tokens, index, cfg.batch_size, cfg.seq_len, cfg.seed, dist_.rank, dist_.world_size)
            x = x.to(device)
            noise = _noise_generator(cfg.seed, index, dist_.rank) if cfg.objective == "block_diffusion" else None
            sync = micro == cfg.grad_accum - 1 or not hasattr(net, "no_sync")
            with contextlib.nullcontext() if sync else net.no_sync():
                with _autocast(device, cfg.dtype):
                    out = _step_loss(net, x, cfg, noise)
                (out["loss"] / cfg.grad_accum).backward()
            records.append(_reduce_metrics(out, dist_))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))  # DTensor-aware
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_this_run += 1
        tokens += tokens_per_step
        dt = time.perf_counter() - t0
        last_train = {"kind": "train", "step": step, "tokens": tokens, **_mean_records(records), "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_step / dt,
                      "elapsed_s": time.perf_counter() - started}
        log(last_train)
        if bar is not None:
            bar.update(1)
            shown = {k: f"{last_train[k]:.3f}" for k in ("loss", "ar_loss", "diff_loss") if k in last_train}
            bar.set_postfix(**shown, tok_s=f"{last_train['tokens_per_s']:.0f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            last_eval = run_eval()
            line = f"{_eval_line(last_eval)} | train loss={last_train['loss']:.3f} tok/s={last_train['tokens_per_s']:.0f}"
            if bar is not None:
                bar.write(line)
            elif dist_.main:
                print(line, flush=True)  # progress=false: still leave a readable log
        stop = _should_stop(cfg, steps_this_run, started, dist_, device)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps or stop:
            save()
            saved_at = step
        if stop:
            break
    if bar is not None:
        bar.close()
    if saved_at != step:  # nothing to train (already at max_steps) still leaves a checkpoint
        save()
    # The current model, loadable as is (also after a stop_after/time limit; its manifest or the
    # metrics say which step it is), so each session of a long run can be evaluated right away.
    snap_state, _ = _gather_state(net, model, opt, cfg, optimizer=False)
    if dist_.main:
        _save_model(_Snapshot(model.config, snap_state), out_dir / "model", cfg,
                    {"step": step, "tokens": tokens, "finished": step >= cfg.max_steps}, tokenizer)
    return {"train": last_train, "eval": last_eval, "step": step, "out_dir": str(out_dir), "model": model}


def _should_stop(cfg: TrainConfig, steps_this_run: int, started: float, dist_: _Dist, device: torch.device) -> bool:
    stop = bool(cfg.stop_after and steps_this_run >= cfg.stop_after)
    stop |= bool(cfg.time_limit_min and time.perf_counter() - started >= 60 * cfg.time_limit_min)
    if dist_.enabled and cfg.time_limit_min:
        import torch.distributed as dist

        # clocks differ between ranks: stop together or the others hang in the next all-reduce
        flag = torch.tensor([float(stop)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


def _gather_state(net: nn.Module, model: Transformer, opt: torch.optim.Optimizer, cfg: TrainConfig,
                  optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model + optimizer state on this process (FSDP: gathered to rank 0; all ranks must call)."""
    if not cfg.fsdp:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, (opt.state_dict() if optimizer else {})
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # full_state_dict + cpu_offload: gathered on rank 0 only (the others get {}), which is who saves
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(net, options=options)
    osd = get_optimizer_state_dict(net, opt, options=options) if optimizer else {}
    return state, osd


def _eval_line(ev: dict[str, Any]) -> str:
    parts = [f"eval step {ev['step']}:"]
    for k in ("val_ar_loss", "val_ppl", "val_diff_loss", "val_accept_est"):
        if k in ev:
            parts.append(f"{k[4:]}={ev[k]:.3f}")
    for k in ("val_acc_data", "val_acc_ar"):
        if k in ev:
            parts.append(f"{k[4:]}=[{' '.join(f'{a:.2f}' for a in ev[k])}]")
    return " ".join(parts)


# -- command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tidar train",
        description="Train TiDAR (or the AR / block diffusion baselines). Settings: a JSON config plus "
                    "key=value overrides (values parsed as JSON, else strings). Resumes automatically "
                    "when out_dir holds a checkpoint.")
    p.add_argument("--config", default=None, help="JSON file of TrainConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, same as --set")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in out_dir and continue it")
    p.add_argument("--dry-run", action="store_true", help="validate everything (data, model), print the config, exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`tidar train ...`; returns 0, or 2 with `error: ...` on stderr for a bad setup."""
    args = _parser().parse_args(argv)
    from tidar.model.weights import WeightsError
    from tidar.train.data import DataError

    dist_ = _Dist()  # the main process until the environment says otherwise: a bad one is reported
    try:
        dist_ = _dist_from_env()
        cfg = TrainConfig.load(args.config, [*args.set, *args.overrides])
        if args.dry_run:
            setup = prepare(cfg, True if args.resume else None)
            model = setup["model"]
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(json.dumps(cfg.to_dict(), indent=2))
            print(f"ok: model {model.num_params():,} params ({n_train:,} trainable), data {setup['shards']}, "
                  f"resume from {setup['checkpoint'] or 'nothing'}")
            return 0
        res = train(cfg, resume=True if args.resume else None)
    except (TrainConfigError, DataError, WeightsError, ConfigError) as e:
        if dist_.main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if dist_.main:
        if res["eval"]:
            print(_eval_line(res["eval"]))
        print(f"done: step {res['step']}, out dir {res['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
