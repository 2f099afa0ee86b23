"""What a training run is asked to do: `TrainConfig`, read from JSON plus `key=value` overrides,
coerced to its fields' types and checked before any work (`check_config`), and the rule for which
keys a resumed run may change (`RESUME_FREE`)."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tidar.model.config import TidarConfig
from tidar.train.errors import TrainConfigError
from tidar.train.objectives import DTYPES, OBJECTIVES, TARGETS

__all__ = ["LINEAR_NAMES", "MODES", "RESUME_FREE", "TrainConfig", "check_config", "check_resume"]

MODES = ("full", "adapter")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_NAMES = ("smollm2", "base", "smollm2-135m-instruct")  # `init` values that mean the base model
SCRATCH = "scratch:"
# Keys that may change between a run and its resumption; anything else would silently change the run.
RESUME_FREE = frozenset({"max_steps", "stop_after", "time_limit_min", "eval_every", "eval_batches", "eval_at_start",
                         "save_every", "keep_checkpoints", "threads", "progress", "data", "out_dir", "device",
                         "tokenizer"})


@dataclass
class TrainConfig:
    """Everything a run needs; loaded from JSON + `key=value` overrides (`TrainConfig.load`)."""

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
        """A JSON file (optional) plus `key=value` overrides, applied in order: values parsed as JSON
        when they parse (`lr=1e-4`, `adapter_layers=[22,23]`, `fsdp=true`), else taken as strings."""
        values = _read_json_config(Path(path)) if path is not None else {}
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


def _read_json_config(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise TrainConfigError(f"config file {p} not found")
    try:
        values = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise TrainConfigError(f"{p} must hold a JSON object")
    values.pop("_comment", None)
    return values


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


# -- validation ------------------------------------------------------------------------------------


def _check_choices(cfg: TrainConfig) -> list[str]:
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
    if cfg.mode == "adapter" and cfg.init.startswith(SCRATCH):
        errs.append("mode 'adapter' needs a pretrained base (init 'smollm2' or a checkpoint dir), not scratch")
    return errs


def _check_precision_and_device(cfg: TrainConfig) -> list[str]:
    errs = []
    if cfg.dtype not in DTYPES:
        errs.append(f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        errs.append(f"device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}")
    elif cfg.device == "cuda" and not torch.cuda.is_available():
        errs.append("device 'cuda' requested but torch sees no GPU")
    return errs


def _check_numbers(cfg: TrainConfig) -> list[str]:
    errs = []
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
    return errs


def _check_adapter_targets(cfg: TrainConfig) -> list[str]:
    if isinstance(cfg.adapter_targets, str) and cfg.adapter_targets != "all":
        return [f"adapter_targets must be 'all' or a list of {LINEAR_NAMES}, got {cfg.adapter_targets!r}"]
    if isinstance(cfg.adapter_targets, list):
        bad = [t for t in cfg.adapter_targets if t not in LINEAR_NAMES]
        if bad or not cfg.adapter_targets:
            return [f"adapter_targets {bad or '[]'} invalid; choose from {LINEAR_NAMES}"]
    return []


def scratch_config(init: str) -> TidarConfig:
    """The model config of an `init` of 'scratch:{JSON object of TidarConfig fields}'."""
    kw = json.loads(init[len(SCRATCH):])
    if not isinstance(kw, dict):
        raise ValueError("not a JSON object")
    return TidarConfig(**kw)


def _check_init(cfg: TrainConfig) -> list[str]:
    if cfg.init.startswith(SCRATCH):
        try:
            scratch_config(cfg.init)
        except (ValueError, TypeError) as e:
            return [f"init 'scratch:...' must be 'scratch:' + a JSON object of TidarConfig fields ({e})"]
    elif cfg.init not in BASE_NAMES and not Path(cfg.init).exists():
        return [f"init {cfg.init!r} is neither 'smollm2', 'scratch:{{...}}' nor an existing model directory"]
    return []


def check_config(cfg: TrainConfig) -> list[str]:
    """Every problem found without the model or the data, as a list of messages."""
    return (_check_choices(cfg) + _check_numbers(cfg) + _check_precision_and_device(cfg) + _check_adapter_targets(cfg)
            + _check_init(cfg))


def check_resume(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    """Refuse to resume checkpoint `path` (made with config `saved`) with other values outside RESUME_FREE."""
    now = cfg.to_dict()
    # keys the checkpoint lacks are newer than it: their defaults reproduce the old behaviour
    diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k not in RESUME_FREE and k in saved and saved[k] != now[k]]
    if diff:
        raise TrainConfigError(f"checkpoint {path} was made with a different config ({'; '.join(diff)}); "
                               "use another out_dir, or remove the checkpoint to start over")
