"""Validation during training: the objective's metrics over fixed batches of the val split, the
same batches (and block diffusion noise) every time, so evaluations of one run compare."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from tidar.train.config import TrainConfig
from tidar.train.loader import val_batches
from tidar.train.objectives import ar_loss, autocast, block_diffusion_loss, noise_generator, tidar_loss

__all__ = ["eval_line", "evaluate"]

# The rank slot of the eval noise: no training rank uses it, so eval never replays a training draw.
_EVAL_NOISE_RANK = 1 << 20


def _tidar_metrics(model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    out = tidar_loss(model, x, cfg.block_size, cfg.alpha, "data")
    return {"val_loss": out["loss"], "val_ar_loss": out["ar_loss"], "val_diff_loss": out["diff_loss"],
            "val_ar_acc": out["ar_acc"], "val_acc_data": out["acc_data"], "val_acc_ar": out["acc_ar"],
            "val_accept_est": out["accept_est"]}


def _baseline_metrics(model: nn.Module, x: torch.Tensor, cfg: TrainConfig, i: int) -> dict[str, torch.Tensor]:
    ar = ar_loss(model, x)
    out = {"val_ar_loss": ar["ar_loss"], "val_ar_acc": ar["ar_acc"]}
    if cfg.objective == "block_diffusion":
        bd = block_diffusion_loss(model, x, cfg.block_size, noise_generator(cfg.seed, i, _EVAL_NOISE_RANK))
        full = block_diffusion_loss(model, x, cfg.block_size, full_mask=True)
        out.update(val_loss=bd["loss"], val_diff_loss=bd["diff_loss"], val_acc_data=full["acc_data"])
    else:
        out["val_loss"] = ar["ar_loss"]
    return out


def _means(sums: dict[str, Any], n: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for k, v in sums.items():
        v = v / max(n, 1)
        res[k] = [round(float(a), 6) for a in v] if v.dim() else float(v)
    if "val_ar_loss" in res:
        res["val_ppl"] = math.exp(min(res["val_ar_loss"], 50.0))
    return res


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, cfg: TrainConfig, device: torch.device | str = "cpu"
             ) -> dict[str, Any]:
    """Validation metrics over `eval_batches` fixed batches of the val split (the same every time).

    Always: `val_ar_loss` and `val_ppl` (AR mode). TiDAR: `val_diff_loss` vs data tokens, draft
    accuracy by offset vs data (`val_acc_data`) and vs the AR argmax (`val_acc_ar`), `val_accept_est`.
    Block diffusion: `val_diff_loss` at random ratios (fixed noise) and one-step full-mask accuracy.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums: dict[str, Any] = {}
    n = 0
    for i, x in enumerate(val_batches(tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches)):
        x = x.to(device)
        with autocast(device, cfg.dtype):
            out = _tidar_metrics(model, x, cfg) if cfg.objective == "tidar" else _baseline_metrics(model, x, cfg, i)
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.double().cpu() * x.shape[0]
        n += x.shape[0]
    model.train(was_training)
    return _means(sums, n)


def eval_line(ev: dict[str, Any]) -> str:
    """One line of an eval record for a log: the losses, then the accuracies by offset."""
    parts = [f"eval step {ev['step']}:"]
    for k in ("val_ar_loss", "val_ppl", "val_diff_loss", "val_accept_est"):
        if k in ev:
            parts.append(f"{k[4:]}={ev[k]:.3f}")
    for k in ("val_acc_data", "val_acc_ar"):
        if k in ev:
            parts.append(f"{k[4:]}=[{' '.join(f'{a:.2f}' for a in ev[k])}]")
    return " ".join(parts)
