"""Everything a run needs, checked and loaded before any training: the config, the data, a
writable out dir, the checkpoint to resume from and the model, set up for its mode."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tidar.model.config import AdapterConfig, ConfigError
from tidar.model.transformer import Transformer
from tidar.train.checkpoint import latest_checkpoint, load_trainer_state
from tidar.train.config import LINEAR_NAMES, SCRATCH, TrainConfig, check_config, check_resume, scratch_config
from tidar.train.errors import DataError, TrainConfigError
from tidar.train.loader import TokenShards

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    model: Transformer  # float32, requires_grad set for the mode; from the checkpoint when resuming
    shards: TokenShards
    checkpoint: Path | None  # the checkpoint to resume from
    trainer_state: dict[str, Any] | None  # its step, tokens, optimizer and RNG states
    tokenizer: Any  # saved next to full checkpoints (None: none)


def _check_out_dir(out_dir: Path) -> str | None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return f"out_dir {out_dir} is not writable ({e})"
    return None


def _check_data(cfg: TrainConfig) -> tuple[list[str], TokenShards | None]:
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


def _check_setup(cfg: TrainConfig) -> TokenShards:
    """The shards, once config, data and out dir pass; else TrainConfigError listing every problem."""
    errs = check_config(cfg)
    shards = None
    if not errs:
        data_errs, shards = _check_data(cfg)
        errs += data_errs
        bad_dir = _check_out_dir(Path(cfg.out_dir))
        if bad_dir:
            errs.append(bad_dir)
    if errs or shards is None:
        raise TrainConfigError("invalid training setup:\n  - " + "\n  - ".join(errs))
    return shards


def _adapter_config(cfg: TrainConfig, n_layers: int) -> AdapterConfig:
    targets = LINEAR_NAMES if cfg.adapter_targets == "all" else tuple(cfg.adapter_targets)
    layers = None
    if cfg.adapter_layers is not None:
        layers = tuple(sorted({i % n_layers for i in cfg.adapter_layers}))
    return AdapterConfig(rank=cfg.adapter_rank, alpha=cfg.adapter_alpha, targets=targets, layers=layers)


def _fit_adapter(model: Transformer, cfg: TrainConfig, resuming: bool) -> None:
    """Add the config's adapter, widen a narrower one the model has, or refuse a different one."""
    want = _adapter_config(cfg, model.config.num_hidden_layers)
    if not model.has_adapter:
        model.add_adapter(want)
        return
    have = model.config.adapter
    if not resuming and want.rank > have.rank and (tuple(have.targets), have.layers) == (want.targets, want.layers):
        # a wider adapter continues from the narrower one's function (capacity experiments)
        model.grow_adapter(want.rank, want.alpha)
    elif (have.rank, have.alpha, tuple(have.targets), have.layers) != (want.rank, want.alpha, want.targets,
                                                                         want.layers):
        raise TrainConfigError(
            f"init {cfg.init} already has an adapter (rank {have.rank}, alpha {have.alpha}, targets "
            f"{list(have.targets)}, layers {have.layers}) that differs from the config's; match them "
            "(or raise only adapter_rank: the adapter is then widened)")


def _set_trainable(model: Transformer, cfg: TrainConfig) -> None:
    trainable = set(map(id, model.adapter_parameters())) if cfg.mode == "adapter" else set(map(id, model.parameters()))
    if cfg.objective == "ar":
        trainable.discard(id(model.mask_embed))  # never used without [MASK] tokens (DDP wants every grad)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def _load_weights(cfg: TrainConfig, checkpoint: Path | None) -> Transformer:
    from tidar.model.weights import load_model

    torch.manual_seed(cfg.seed)  # the adapter's LoRA A init draws from the global RNG
    if checkpoint is not None:
        return load_model(checkpoint / "model")
    if cfg.init.startswith(SCRATCH):
        return Transformer(scratch_config(cfg.init)).init_weights(std=0.02, seed=cfg.seed)
    return load_model(cfg.init)


def _build_model(cfg: TrainConfig, checkpoint: Path | None) -> Transformer:
    """The model in float32 with requires_grad set for the mode; from the checkpoint when resuming."""
    model = _load_weights(cfg, checkpoint)
    n_layers = model.config.num_hidden_layers
    if cfg.adapter_layers is not None:
        bad = [i for i in cfg.adapter_layers if not -n_layers <= i < n_layers]
        if bad:
            raise TrainConfigError(f"adapter_layers {bad} out of range for a {n_layers}-layer model")
    if cfg.mode == "adapter":
        _fit_adapter(model, cfg, resuming=checkpoint is not None)
    elif model.has_adapter:
        raise TrainConfigError(f"mode 'full' needs a model without an adapter, but {cfg.init} has one")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise TrainConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                               f"{model.config.max_position_embeddings}")
    model.config.block_size = cfg.block_size
    model.float().train()
    _set_trainable(model, cfg)
    return model


def prepare(cfg: TrainConfig, resume: bool | None = None) -> Prepared:
    """Validate everything a run needs (config, data, out_dir, model) and load it; raises
    TrainConfigError with every problem found. `resume`: None = when a checkpoint exists,
    True = a checkpoint must exist, False = start over."""
    shards = _check_setup(cfg)
    out_dir = Path(cfg.out_dir)
    checkpoint = latest_checkpoint(out_dir)
    if resume and checkpoint is None:
        raise TrainConfigError(f"--resume given but {out_dir} holds no checkpoint")
    if resume is False:
        checkpoint = None
    trainer_state = None
    if checkpoint is not None:
        trainer_state = load_trainer_state(checkpoint)
        check_resume(trainer_state["config"], cfg, checkpoint)
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
    return Prepared(model, shards, checkpoint, trainer_state, tokenizer)
