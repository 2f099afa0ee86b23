"""Checkpoints of a run's out dir: `ckpt-<step>/{model/, trainer.pt}` + `latest` (the one to resume
from), written so that a crash at any point leaves the previous one usable, and the loadable
`model/` directory (an adapter manifest or a full checkpoint, as `tidar.model.weights.load_model` opens)."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tidar.model.config import TidarConfig
from tidar.train.config import BASE_NAMES, TrainConfig
from tidar.train.errors import TrainConfigError

__all__ = ["CHECKPOINT_PREFIX", "Snapshot", "atomic_text", "latest_checkpoint", "load_trainer_state", "restore_rng",
           "save_checkpoint", "save_model", "seed_everything"]

CHECKPOINT_PREFIX = "ckpt-"
TRAINER_STATE = "trainer.pt"


class Snapshot:
    """Duck-types the bits of a Transformer that weights.save_pretrained/save_adapter read, so a
    gathered (FSDP) state dict saves through the same code as a plain model."""

    def __init__(self, config: TidarConfig, state: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._state.items())


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none."""
    latest = out_dir / "latest"
    if not latest.is_file():
        return None
    path = out_dir / latest.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise TrainConfigError(f"{latest} points to {path}, which is not a complete checkpoint; remove {latest} "
                               "to start over")
    return path


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """Step, tokens, optimizer, RNG states and config of a checkpoint."""
    return torch.load(checkpoint / TRAINER_STATE, weights_only=False)  # our own file


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict[str, Any]) -> None:
    """Every RNG as a checkpoint saved it, so a resumed run draws what the straight run would have."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _base_name(init: str) -> str:
    """What an adapter manifest should name as its base: loadable from any working directory."""
    if init in BASE_NAMES:
        return "smollm2"
    from tidar.model.weights import read_manifest

    path = Path(init).resolve()
    manifest = read_manifest(path)
    if manifest is not None:  # continuing an adapter: its base, not the adapter itself
        return manifest.get("base", "smollm2")
    return str(path)


def save_model(snapshot: Snapshot, directory: Path, cfg: TrainConfig, extra: dict[str, Any], tokenizer: Any) -> None:
    """A loadable model directory: an adapter (+ manifest with `extra`) or a full checkpoint."""
    from tidar.model.weights import save_adapter, save_pretrained

    if cfg.mode == "adapter":
        manifest = {"base": _base_name(cfg.init), "objective": cfg.objective, "targets": cfg.targets, **extra}
        save_adapter(snapshot, directory, manifest)  # type: ignore[arg-type]
    else:
        save_pretrained(snapshot, directory, tokenizer=tokenizer)  # type: ignore[arg-type]


def _rotate(out_dir: Path, current: str, keep: int) -> None:
    """Remove the oldest checkpoints but `current`, keeping `keep` in all."""
    old = sorted(p for p in out_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name != current)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out_dir: Path, step: int, tokens: int, snapshot: Snapshot, optim_state: dict[str, Any],
                    cfg: TrainConfig, world_size: int, tokenizer: Any) -> Path:
    """ckpt-<step>/ written under a temporary name and renamed into place, then `latest` is switched
    atomically: a crash at any point leaves the previous checkpoint usable."""
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(snapshot, tmp / "model", cfg, {"step": step, "tokens": tokens}, tokenizer)
    state = {
        "step": step,
        "tokens": tokens,
        "optimizer": optim_state,
        "scheduler": {"kind": "warmup_cosine", "step": step},  # the lr is a pure function of step
        "rng": _rng_state(),
        "config": cfg.to_dict(),
        "world_size": world_size,
    }
    torch.save(state, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_text(out_dir / "latest", name + "\n")
    _rotate(out_dir, name, cfg.keep_checkpoints)
    return final
