"""The training objectives: TiDAR's (TIDAR.md §3: AR loss on the clean copy, diffusion loss on the
masked copy), and the AR and Block Diffusion baselines, all on the same model and masks.

Each returns `loss` (with grad) and detached metrics (scalars, or (block_size,) vectors by offset).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tidar.masks import block_diffusion_training_mask, causal_mask, tidar_training_mask
from tidar.model.transformer import KVCache, Transformer

__all__ = ["DTYPES", "OBJECTIVES", "TARGETS", "ar_loss", "autocast", "block_diffusion_loss", "noise_generator",
           "self_kl", "tidar_loss"]

OBJECTIVES = ("tidar", "ar", "block_diffusion")
TARGETS = ("data", "self", "self-kl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The precision the objectives run at: autocast for 'bfloat16' (master weights stay float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def noise_generator(seed: int, index: int, rank: int) -> torch.Generator:
    """Block diffusion's masking noise for batch `index` on `rank`: a pure function of its arguments."""
    state = np.random.SeedSequence([seed, index, rank, 0xB1D]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def self_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_teacher || q_student) over positions, from logits (..., V); the teacher gets no gradient.

    Computed as H(p, q) - H(p): soft-target cross-entropy has the written-out KL's gradient at ~80% of
    its cost (benchmarks/kl_loss_cost.py), and the entropy term, gradient-free, makes the value the KL.
    """
    p = F.softmax(teacher.detach(), dim=-1)
    return F.cross_entropy(student.flatten(0, -2), p.flatten(0, -2)) - torch.special.entr(p).sum(-1).mean()


def _tidar_logits(model: nn.Module, x: torch.Tensor, block_size: int, cached_clean: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean logits, mask logits), each (B, L, V), of [x | L x MASK] under `tidar_training_mask`."""
    core = _core(model)
    cfg = core.config
    B, L = x.shape
    attn, pos = tidar_training_mask(L, block_size, x.device)  # (2L, 2L), (2L,)
    masks = torch.full_like(x, cfg.mask_token_id)
    if not cached_clean:
        logits = model(torch.cat([x, masks], dim=1), pos[None], attn[None, None])  # (B, 2L, V)
        return logits[:, :L], logits[:, L:]
    # The clean half never attends to mask tokens, so it is exactly a causal pass over x: run it
    # without a graph, keep its K/V, then run the mask half against that cache.
    dtype = next(core.parameters()).dtype
    cache = KVCache(cfg, B, 2 * L, dtype, device=x.device)
    with torch.no_grad():
        clean_logits = model(x, pos[None, :L], attn[None, None, :L, :L], cache=cache, offset=0)
    return clean_logits, model(masks, pos[None, L:], attn[None, None, L:, :], cache=cache, offset=L)


def _diffusion_loss(mask_logits: torch.Tensor, ar_logits: torch.Tensor, x: torch.Tensor, targets: str
                    ) -> torch.Tensor:
    """Mask position i against x_i ('data'), the AR argmax for i ('self') or the AR distribution ('self-kl')."""
    if targets == "data":
        return F.cross_entropy(mask_logits.flatten(0, 1), x.flatten())
    if targets == "self":
        return F.cross_entropy(mask_logits[:, 1:].flatten(0, 1), ar_logits.detach().argmax(-1).flatten())
    return self_kl(mask_logits[:, 1:], ar_logits.detach())


def _accept_est(hit_ar: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """Mean tokens a pass would commit under teacher forcing, from draft == AR argmax (B, L-1)."""
    B, n_blocks = hit_ar.shape[0], (hit_ar.shape[1] + 1) // block_size
    if n_blocks <= 1:
        return None
    # (B, n_blocks-1, b): offsets of blocks 1.. (block 0 has no AR prediction at offset 0)
    blocks = torch.cat([hit_ar.new_ones(B, 1), hit_ar], dim=1).view(B, n_blocks, block_size)[:, 1:]
    # offset 0 is always committed (it is the AR token); then the run of matches from offset 1
    run = blocks[..., 1:].long().cumprod(-1).sum(-1)
    return (1 + run).float().mean()


@torch.no_grad()
def _draft_metrics(mask_logits: torch.Tensor, ar_pred: torch.Tensor, x: torch.Tensor, block_size: int
                   ) -> dict[str, torch.Tensor]:
    draft = mask_logits.argmax(-1)  # (B, L)
    positions = torch.arange(x.shape[1], device=x.device)
    hit_ar = draft[:, 1:] == ar_pred  # (B, L-1), positions 1..L-1
    out = {
        "ar_acc": (ar_pred == x[:, 1:]).float().mean(),
        "acc_data": _by_offset(draft == x, positions, block_size),
        "acc_ar": _by_offset(hit_ar, positions[1:], block_size),
    }
    accept = _accept_est(hit_ar, block_size)
    if accept is not None:
        out["accept_est"] = accept
    return out


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
    if cached_clean is None:
        cached_clean = _frozen_base(_core(model))
    clean_logits, mask_logits = _tidar_logits(model, x, block_size, cached_clean)
    ar_logits = clean_logits[:, :-1].float()  # (B, L-1): predictions for positions 1..L-1
    ar = F.cross_entropy(ar_logits.flatten(0, 1), x[:, 1:].flatten())
    mask_logits = mask_logits.float()
    diff = _diffusion_loss(mask_logits, ar_logits, x, targets)
    metrics = _draft_metrics(mask_logits, ar_logits.detach().argmax(-1), x, block_size)
    return {"loss": (alpha * ar + diff) / (1 + alpha), "ar_loss": ar.detach(), "diff_loss": diff.detach(), **metrics}


def ar_loss(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain causal LM loss over x (B, L): the AR baseline, and how any model is scored in AR mode."""
    L = x.shape[1]
    logits = model(x, torch.arange(L, device=x.device)[None], causal_mask(L, x.device)[None, None])
    ar_logits = logits[:, :-1].float()
    loss = F.cross_entropy(ar_logits.flatten(0, 1), x[:, 1:].flatten())
    return {"loss": loss, "ar_loss": loss.detach(),
            "ar_acc": (ar_logits.detach().argmax(-1) == x[:, 1:]).float().mean()}


def _noisy_positions(x: torch.Tensor, block_size: int, generator: torch.Generator | None, full_mask: bool
                     ) -> torch.Tensor:
    """(B, L) bool: per block a ratio t ~ U(0, 1], each token masked with probability t (all when full_mask)."""
    if full_mask:
        return torch.ones_like(x, dtype=torch.bool)
    B, L = x.shape
    # Drawn on the CPU from an explicit generator, so the noise is a pure function of the step.
    t = 1.0 - torch.rand(B, L // block_size, 1, generator=generator)  # (0, 1]
    masked = (torch.rand(B, L // block_size, block_size, generator=generator) < t).view(B, L).to(x.device)
    if not masked.any():
        # Keep [MASK] in the graph (DDP expects a gradient for every trainable parameter).
        masked[0, 0] = True
    return masked


def block_diffusion_loss(model: nn.Module, x: torch.Tensor, block_size: int,
                         generator: torch.Generator | None = None, full_mask: bool = False) -> dict[str, torch.Tensor]:
    """BD3-LM style baseline: [x | x_t] under `block_diffusion_training_mask`, where each block of the
    noisy copy draws a masking ratio t ~ U(0, 1] and masks each token with probability t (all of
    them when `full_mask`, i.e. one-step drafting). Loss: plain mean CE over masked positions; the
    clean copy gets no loss. `acc_data` (block_size,) is the accuracy at masked positions by offset.
    """
    L = x.shape[1]
    attn, pos = block_diffusion_training_mask(L, block_size, x.device)
    masked = _noisy_positions(x, block_size, generator, full_mask)
    noisy = x.masked_fill(masked, _core(model).config.mask_token_id)
    logits = model(torch.cat([x, noisy], dim=1), pos[None], attn[None, None])[:, L:].float()  # (B, L, V)
    loss = F.cross_entropy(logits[masked], x[masked])
    with torch.no_grad():
        hit = (logits.argmax(-1) == x).float()
        offsets = torch.arange(L, device=x.device) % block_size
        sums = torch.zeros(block_size, device=x.device).index_add_(0, offsets, (hit * masked).sum(0))
        counts = torch.zeros(block_size, device=x.device).index_add_(0, offsets, masked.float().sum(0))
    return {"loss": loss, "diff_loss": loss.detach(), "acc_data": sums / counts.clamp_min(1)}
