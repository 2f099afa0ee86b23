"""Model configuration: one dataclass, read from / written to a Hugging Face style config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""


@dataclass
class AdapterConfig:
    """Trainable weights applied only at [MASK] positions (frozen base = lossless AR path)."""

    rank: int = 16
    alpha: float = 32.0
    # Which linear layers get a LoRA branch; names follow the HF Llama module names.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Layers (indices) that get adapters; None = all layers.
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        if self.rank < 1:
            raise ConfigError(f"adapter rank must be >= 1, got {self.rank}")


@dataclass
class TidarConfig:
    """Architecture of a Llama/Qwen2-family decoder plus the TiDAR [MASK] token."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 uses a bias on q/k/v
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # The [MASK] id is one past the vocabulary: its embedding is an extra trainable vector and the
    # LM head never scores it, so AR logits of the base model are untouched (see model.Embedding).
    mask_token_id: int | None = None
    block_size: int = 4  # TiDAR draft length b the model was trained for
    adapter: AdapterConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown HF keys, kept for round-trips

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.model_type not in ("llama", "qwen2"):
            raise ConfigError(f"model_type {self.model_type!r} not supported (use 'llama' or 'qwen2')")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # -- Hugging Face interop -------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> TidarConfig:
        """Build from a transformers LlamaConfig/Qwen2Config dict (config.json)."""
        hf = dict(hf)
        model_type = hf.get("model_type", "llama")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"rope scaling {rope.get('rope_type')!r} is not supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: hf[k] for k in known if k in hf and k not in ("adapter", "extra")}
        kwargs["rope_theta"] = float(rope_theta)
        kwargs["model_type"] = model_type
        if model_type == "qwen2":
            kwargs.setdefault("attention_bias", True)
        tidar = hf.get("tidar", {})
        for k in ("mask_token_id", "block_size"):
            if k in tidar:
                kwargs[k] = tidar[k]
        if tidar.get("adapter"):
            kwargs["adapter"] = AdapterConfig(**tidar["adapter"])
        extra = {k: v for k, v in hf.items() if k not in known and k not in ("tidar", "rope_parameters")}
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        return cls(**kwargs, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers opens as a plain Llama/Qwen2 (the AR part of the model)."""
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name in ("adapter", "extra", "mask_token_id", "block_size", "rope_theta"):
                continue
            out[f.name] = getattr(self, f.name)
        out["architectures"] = ["LlamaForCausalLM" if self.model_type == "llama" else "Qwen2ForCausalLM"]
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        out["rope_theta"] = self.rope_theta
        out["hidden_act"] = "silu"
        out.pop("quantization_config", None)
        out["tidar"] = {
            "mask_token_id": self.mask_token_id,
            "block_size": self.block_size,
            "adapter": asdict(self.adapter) if self.adapter else None,
        }
        return out

    @classmethod
    def load(cls, path: str | Path) -> TidarConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(data)

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf(), indent=2, default=list) + "\n")
