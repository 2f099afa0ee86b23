"""What a reproduction run is asked to do (`configs/reproduce.json`): the corpus and tokenizer, the
model, the shared AR pretraining, the equal-token continuations and the measurements. Checked
before any work, so a typo fails in a second rather than after an hour of training."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tidar.decode.options import GenerationError, check_sweep
from tidar.model.config import ConfigError, TidarConfig
from tidar.train.config import TrainConfig, check_config
from tidar.train.errors import TrainConfigError
from tidar.train.objectives import OBJECTIVES

__all__ = ["ReproduceConfig", "ReproduceError"]

# Keys the pipeline sets itself for every training stage; a config may not override them.
_PIPELINE_KEYS = frozenset({"init", "mode", "objective", "data", "tokenizer", "out_dir", "progress", "targets"})


class ReproduceError(ValueError):
    """A reproduction config or run directory that cannot work; the message says what to change."""


@dataclass
class EvalSpec:
    """The measurements on held-out text after training."""

    prompts: int = 24  # prompts cut from the val split (evenly spaced)
    prompt_tokens: int = 64
    new_tokens: int = 64
    block_sizes: list[int] = field(default_factory=lambda: [2, 3, 4])  # TiDAR, diffusion drafts only
    betas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # TiDAR at the trained b
    thresholds: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5])  # block diffusion decoding
    dtype: str = "float32"  # float32: TiDAR == AR is then exact, not subject to bf16 near-ties
    ppl_seq_len: int = 256


@dataclass
class ReproduceConfig:
    sources: list[str] = field(default_factory=lambda: ["stdlib"])
    vocab_size: int = 4096
    model: dict[str, Any] = field(default_factory=dict)  # TidarConfig fields (vocab and special ids are set here)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys shared by every stage
    pretrain: dict[str, Any] = field(default_factory=dict)  # ... for the shared AR pretraining
    continued: dict[str, Any] = field(default_factory=dict)  # ... for each continuation (equal tokens)
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES))
    eval: EvalSpec = field(default_factory=EvalSpec)

    @classmethod
    def load(cls, path: str | Path) -> ReproduceConfig:
        p = Path(path)
        try:
            values = json.loads(p.read_text())
        except OSError as e:
            raise ReproduceError(f"cannot read {p} ({e.strerror}); pass a config such as configs/reproduce.json") from None
        except json.JSONDecodeError as e:
            raise ReproduceError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise ReproduceError(f"{p} must hold a JSON object")
        values.pop("_comment", None)
        cfg = cls._from_dict(values, cls, str(p))
        cfg.check()
        return cfg

    @staticmethod
    def _from_dict(values: dict[str, Any], kind: type, where: str) -> Any:
        known = {f.name for f in fields(kind)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ReproduceError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        if kind is ReproduceConfig and isinstance(values.get("eval"), dict):
            values = {**values, "eval": ReproduceConfig._from_dict(values["eval"], EvalSpec, where + " eval")}
        try:
            return kind(**values)
        except TypeError as e:
            raise ReproduceError(f"{where}: {e}") from None

    def model_config(self) -> dict[str, Any]:
        """The scratch model: the configured architecture with this run's vocabulary; id 0 (the
        tokenizer's end of text) is both bos and eos."""
        return {**self.model, "vocab_size": self.vocab_size, "bos_token_id": 0, "eos_token_id": 0}

    def train_config(self, stage: dict[str, Any], **pipeline: Any) -> TrainConfig:
        """The TrainConfig of one stage: shared keys, the stage's keys, then the pipeline's own."""
        try:
            cfg = TrainConfig.from_dict({**self.train, **stage, **pipeline})
        except TrainConfigError as e:
            raise ReproduceError(f"training config: {e}") from None
        errors = check_config(cfg)
        if errors:
            raise ReproduceError(f"training config: {'; '.join(errors)}")
        return cfg

    def check(self) -> None:
        clash = sorted((set(self.train) | set(self.pretrain) | set(self.continued)) & _PIPELINE_KEYS)
        if clash:
            raise ReproduceError(f"train/pretrain/continued may not set {', '.join(clash)}: the pipeline sets them")
        if not self.sources:
            raise ReproduceError("sources is empty; name at least one corpus (e.g. stdlib)")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise ReproduceError(f"objectives must be a non-empty list of {', '.join(OBJECTIVES)}; got {self.objectives}")
        try:
            TidarConfig(**self.model_config())
        except (TypeError, ConfigError) as e:
            raise ReproduceError(f"model: {e}") from None
        self._check_eval()
        for stage in (self.pretrain, self.continued):  # every key and value, before hours of work
            self.train_config(stage, init="scratch:{}", mode="full", objective="ar")

    def _check_eval(self) -> None:
        ev = self.eval
        if min(ev.prompts, ev.prompt_tokens, ev.new_tokens, ev.ppl_seq_len) < 1:
            raise ReproduceError("eval: prompts, prompt_tokens, new_tokens and ppl_seq_len must be >= 1")
        if ev.dtype not in ("float32", "bfloat16"):
            raise ReproduceError(f"eval: dtype must be float32 or bfloat16, got {ev.dtype!r}")
        if not all(0 < t <= 1 for t in ev.thresholds):
            raise ReproduceError(f"eval: thresholds must be in (0, 1], got {ev.thresholds}")
        try:
            check_sweep({"block_size": ev.block_sizes, "beta": ev.betas})
        except GenerationError as e:
            raise ReproduceError(f"eval: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
