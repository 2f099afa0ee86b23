"""TiDAR for transformers: a Llama causal LM plus an adapter that acts only at [MASK] rows.

`TidarForCausalLM` *is* `LlamaForCausalLM` for ordinary token ids: the adapter's LoRA branches are
skipped and the [MASK] embedding is unused, so its logits, its KV cache and transformers' own
`generate()` loop are the base model's. A forward whose `input_ids` contain the [MASK] id
(`config.tidar["mask_token_id"]`, one past the vocabulary) embeds those positions with
`model.tidar_mask_embed` and adds the LoRA branches on those rows only. With a TiDAR attention mask
(`tidar_logits`) that forward is one TiDAR step: causal rows verify a draft, [MASK] blocks draft the
next one; custom_generate/generate.py runs the loop.

Self-contained on purpose (torch and transformers only): it runs where `tidar` is not installed.
Weight names are those of tidar's own checkpoints (`...q_proj.lora_a`, `model.tidar_mask_embed`).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers import initialization as init

from .configuration_tidar import TidarConfig


class MaskRowLoRA(nn.Linear):
    """nn.Linear plus a LoRA branch added only on the rows flagged in `rows` (the [MASK] positions),
    so every other row keeps the base output bit for bit."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        w = base.weight
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device=w.device, dtype=w.dtype)
        self.lora_a = nn.Parameter(torch.zeros(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.lora_scale = alpha / rank
        # (B, T) bool, set by TidarForCausalLM for one forward: the Llama modules pass no such argument down
        self.rows: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.rows is None:
            return out
        delta = F.linear(F.linear(x[self.rows], self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.lora_scale
        out[self.rows] += delta
        return out


def attach_adapter(layers: nn.ModuleList, adapter: dict) -> list[MaskRowLoRA]:
    """Swap the targeted projections of the chosen layers for MaskRowLoRA (tidar's adapter layout)."""
    targets = set(adapter["targets"])
    chosen = range(len(layers)) if adapter.get("layers") is None else adapter["layers"]
    swapped = []
    for i in chosen:
        for parent in (layers[i].self_attn, layers[i].mlp):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    lora = MaskRowLoRA(child, int(adapter["rank"]), float(adapter["alpha"]))
                    setattr(parent, name, lora)
                    swapped.append(lora)
    return swapped


class TidarForCausalLM(LlamaForCausalLM):
    config_class = TidarConfig
    config: TidarConfig

    def __init__(self, config: TidarConfig) -> None:
        super().__init__(config)
        settings = config.tidar_settings()
        self.mask_token_id = int(settings["mask_token_id"])
        self.block_size = int(settings["block_size"])
        self.model.tidar_mask_embed = nn.Parameter(torch.zeros(config.hidden_size))
        adapter = settings["adapter"]
        self.adapter_modules = attach_adapter(self.model.layers, adapter) if adapter else []
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # only reached for weights a checkpoint lacks: a zero B makes a missing adapter a no-op
        if isinstance(module, MaskRowLoRA):
            init.normal_(module.lora_a, std=0.02)
            init.zeros_(module.lora_b)
        if hasattr(module, "tidar_mask_embed"):
            init.zeros_(module.tidar_mask_embed)

    @contextmanager
    def _adapter_rows(self, rows: torch.Tensor | None) -> Iterator[None]:
        for m in self.adapter_modules:
            m.rows = rows
        try:
            yield
        finally:
            for m in self.adapter_modules:
                m.rows = None

    def _embed_with_mask(self, input_ids: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
        # the [MASK] id is past the embedding table: look up a real id there, then overwrite the row
        x = self.model.embed_tokens(input_ids.masked_fill(is_mask, 0))
        return torch.where(is_mask.unsqueeze(-1), self.model.tidar_mask_embed.to(x.dtype), x)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,  # noqa: ANN001
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):  # noqa: ANN001, ANN003, ANN201
        """LlamaForCausalLM's forward; [MASK] ids in `input_ids` get the [MASK] embedding and the adapter."""
        rows = None
        if input_ids is not None and inputs_embeds is None:
            is_mask = input_ids == self.mask_token_id
            if bool(is_mask.any()):
                inputs_embeds, input_ids, rows = self._embed_with_mask(input_ids, is_mask), None, is_mask
        with self._adapter_rows(rows):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    def tidar_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor,
                     past_key_values=None) -> torch.Tensor:  # noqa: ANN001
        """Float32 logits (B, T, V) of T new tokens at explicit positions under an explicit boolean mask
        `allowed` (B or 1, T, S + T), True = may attend, over S cached tokens and the T new ones: the
        form a TiDAR step needs. A cache given gets all T tokens; the caller crops what it keeps.
        Needs the eager or sdpa attention (a custom mask)."""
        bias = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        bias.masked_fill_(~allowed.to(self.device), torch.finfo(self.dtype).min)  # additive: eager and sdpa alike
        out = self(input_ids=input_ids.to(self.device), attention_mask=bias.unsqueeze(1),
                   position_ids=position_ids.to(self.device), past_key_values=past_key_values,
                   use_cache=past_key_values is not None)
        return out.logits.float()
