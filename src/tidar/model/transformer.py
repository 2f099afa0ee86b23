"""A Llama/Qwen2-family decoder in plain PyTorch, read top to bottom.

Every forward takes explicit position ids and an explicit boolean attention mask, so one pass can
mix causal (AR) tokens and block-bidirectional [MASK] tokens: that is all TiDAR needs from the
architecture. The [MASK] token and the optional adapter only ever touch mask positions, so the
AR path of the network computes exactly the base model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tidar.model import kernels
from tidar.model.config import AdapterConfig, TidarConfig

# Which rows are [MASK] tokens: None (none), an int (rows from there on, per sequence), or a bool (B, T)
MaskRows = int | torch.Tensor | None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementation, so bf16 runs round the same way
        # (the fused kernel rounds exactly like x * rsqrt(mean(x^2) + eps) in float32: tested).
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pre-pack this weight (a CPU float32/bfloat16 build with mkldnn)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# Above this many input features oneDNN's bf16 matmul sums a row's products in an order that
# depends on how many rows the call has, so a token verified among others could round differently
# from the same token alone. Packed bf16 weights are split into column chunks of at most this
# width, each of which sums the same way for 1 row or 30, and the chunks' outputs are added.
MAX_PACKED_K = 1024


@dataclass
class PackedWeight:
    """A weight in oneDNN's blocked layout: (first input column, last + 1, packed) per chunk."""

    chunks: list[tuple[int, int, torch.Tensor]]


def pack_weight(weight: torch.Tensor) -> PackedWeight | None:
    """The (out, in) weight in oneDNN's blocked layout, or None where that is unavailable.

    An unpacked CPU `F.linear` re-lays its weight out on every call; for a decode step's few rows
    that costs as much as the matmul itself (packing halved a bf16 SmolLM2 step's matmul time here).
    """
    if not packable(weight):
        return None
    k = weight.shape[1]
    n = -(-k // MAX_PACKED_K) if weight.dtype == torch.bfloat16 else 1
    bounds = [round(i * k / n) for i in range(n + 1)]
    try:
        packed = PackedWeight([(lo, hi, torch.ops.mkldnn._reorder_linear_weight(weight[:, lo:hi].detach().contiguous(), 1))
                               for lo, hi in zip(bounds, bounds[1:], strict=False)])
        # some builds/CPUs (e.g. without native bf16) fail only when the packed weight is used
        linear(weight.new_zeros(1, k), weight, packed)
    except RuntimeError:
        return None
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through the pre-packed weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    out = None
    for lo, hi, w in packed.chunks:
        part = x if hi - lo == x.shape[-1] else x[..., lo:hi].contiguous()
        y = torch.ops.mkldnn._linear_pointwise(part, w, bias if out is None else None, "none", [], "")
        out = y if out is None else out + y  # not in place: a forward with grad enabled must work too
    return out


class Linear(nn.Linear):
    """nn.Linear plus an optional LoRA branch that is added only on rows flagged as [MASK] tokens."""

    def add_adapter(self, rank: int, alpha: float) -> None:
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_scale = alpha / rank

    @torch.no_grad()
    def grow_adapter(self, rank: int, alpha: float) -> None:
        """Widen the LoRA branch to `rank` without changing what it computes: the new A rows start
        random and the new B columns at zero, and B is rescaled for the new alpha/rank."""
        old_a, old_b, old_scale = self.lora_a.data, self.lora_b.data, self.lora_scale
        self.add_adapter(rank, alpha)
        self.lora_a.data[: old_a.shape[0]] = old_a
        self.lora_b.data[:, : old_b.shape[1]] = old_b * (old_scale / self.lora_scale)
        self.lora_a.data, self.lora_b.data = (self.lora_a.data.to(old_a), self.lora_b.data.to(old_b))

    def forward(self, x: torch.Tensor, mask_rows: MaskRows = None) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if mask_rows is None or not hasattr(self, "lora_a"):
            return out
        # The adapter only sees mask rows; clean rows keep the base output bit for bit. Mask rows
        # are usually a suffix of the sequence (an int start): a slice is far cheaper than a gather.
        sel = (slice(None), slice(mask_rows, None)) if isinstance(mask_rows, int) else mask_rows
        delta = F.linear(F.linear(x[sel], self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.lora_scale
        out[sel] += delta
        return out


DENSE_RELEASED = ("this model's dense base weights were released after loading (its base projections run "
                  "only on the GGUF's Q4_1 blocks, the inference runtime's default): it cannot be trained, saved "
                  "or switched to dense weights; load it again with load_model, or with --weights dense")


class DenseReleasedError(RuntimeError):
    """Training, saving or a dense path asked of a model whose dense base weights were released."""


class FusedLinear(nn.Module):
    """Linear layers that share an input, run as one matmul at inference (fewer, larger kernels:
    per-op overhead is a large share of a CPU decode step for a model this small).

    The parts' weights become views into the fused weight, so nothing is stored twice. Their LoRA
    branches (mask rows only) are fused too: the stacked A matrices ride along as extra output rows
    of the base matmul (its down-projection costs no extra kernel), and one up-projection through a
    block-diagonal B with the scale folded in is added on the mask rows.
    """

    def __init__(self, parts: list[Linear], q4: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """`q4`: the base rows' matmul on 4-bit blocks (see `use_q4`); then the parts' dense weights are
        not read (they may be meta tensors) and `weight` holds only the adapter's A rows: the state
        `use_q4` then `release_base` leave, without the dense base ever being concatenated."""
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        self.n_out = sum(self.sizes)
        has_lora = all(hasattr(p, "lora_a") for p in parts)
        if not has_lora and any(hasattr(p, "lora_a") for p in parts):
            raise ValueError("fuse only layers that all have, or all lack, an adapter")
        lora_rows = [p.lora_a.data for p in parts] if has_lora else []
        base_rows = [p.weight.data for p in parts] if q4 is None else []
        weight = (torch.cat(base_rows + lora_rows) if base_rows + lora_rows  # (sum out [+ sum r], in)
                  else torch.empty(0, parts[0].in_features, dtype=parts[0].weight.dtype))
        bias = None
        if parts[0].bias is not None:
            bias = torch.cat([p.bias.data for p in parts])
            if has_lora:
                bias = torch.cat([bias, bias.new_zeros(sum(r.shape[0] for r in lora_rows))])
        start = 0
        for p, n in zip(parts, self.sizes, strict=True):
            if q4 is None:
                p.weight.data = weight[start:start + n]
            if bias is not None:
                p.bias.data = bias[start:start + n]
            start += n
        # Buffers, not parameters: nothing new to train or save, but torch.compile sees them as
        # inputs, so one compiled graph serves every layer.
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        lora_b = torch.block_diag(*[p.lora_b.data * p.lora_scale for p in parts]) if has_lora else None
        self.register_buffer("lora_b", lora_b, persistent=False)  # (sum out, sum r), scaled
        lora_bt = lora_b.t().contiguous() if has_lora else None
        # the parts' cumulative output columns and ranks: the kernel skips lora_bt's off-diagonal zeros
        self.col_bounds = [sum(self.sizes[:i]) for i in range(len(parts) + 1)]
        self.rank_bounds = [sum(p.lora_a.shape[0] for p in parts[:i]) for i in range(len(parts) + 1)] if has_lora else []
        self.register_buffer("lora_bt", lora_bt, persistent=False)  # (sum r, sum out): `kernels.lora_add_`'s layout
        # plain flags for the per-step path (a buffer lookup goes through nn.Module.__getattr__);
        # has_adapter is the one switch for the [MASK]-row branch (an A/B may turn it off)
        self.has_adapter, self.has_bias = has_lora, bias is not None
        self.kernels = False  # add the [MASK]-row branch with the compiled kernel (Transformer.use_kernels)
        # oneDNN-packed copies (see `pack_weight`): plain attributes, never saved or moved
        self.packed_base: PackedWeight | None = None
        self.packed_full: PackedWeight | None = None
        self.packed_lora_a: PackedWeight | None = None  # the adapter's A rows alone, beside a `q4` base
        self.packed_lora_b: PackedWeight | None = None
        self.q4_full: Callable[[torch.Tensor], torch.Tensor] | None = None  # q4 base rows, then the A rows
        self.packing = False
        # the base rows' matmul on 4-bit blocks (x -> x @ W_base^T, `quant.Q4Weight`), or None: the dense weight
        self.q4 = q4
        # the adapter's A rows in `weight` start here (0 once `release_base` ran, or built on `q4`)
        self.a_start = self.n_out if q4 is None else 0

    def release_base(self) -> None:
        """Keep only the adapter's A rows of `weight`: the q4 matmul computes the base rows, and their
        dense copy (the bulk of the model's memory) is never read again."""
        if self.q4 is None:
            raise DenseReleasedError("release_base needs the base rows on the q4 path (use_q4) first")
        self.weight = self.weight[self.a_start:].clone()
        self.a_start = 0

    def pack(self, enable: bool = True) -> None:
        """Pre-pack the weights for CPU inference (or drop the packed copies: enable=False)."""
        lora, dense = self.has_adapter, self.q4 is None
        self.packing = enable
        self.packed_base = pack_weight(self.weight[: self.n_out]) if enable and dense else None
        self.packed_full = pack_weight(self.weight) if enable and lora and dense else None
        # the adapter's A rows in the q4 matmul's own call, where it can (`quant.Q4Weight.with_rows`);
        # else their own packed matmul
        with_rows = getattr(self.q4, "with_rows", None)
        self.q4_full = with_rows(self.weight[self.a_start:]) if enable and lora and with_rows else None
        separate_a = enable and lora and not dense and self.q4_full is None
        self.packed_lora_a = pack_weight(self.weight[self.a_start:]) if separate_a else None
        self.packed_lora_b = pack_weight(self.lora_b) if enable and lora else None

    def use_q4(self, matmul: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Compute the base rows with `matmul` (see `quant.quantize_q4_`; None: the dense weight again).
        The adapter's A rows stay dense: in the same call where `matmul.with_rows` allows, else a
        separate small matmul (`pack`)."""
        if matmul is None and self.a_start != self.n_out:
            raise DenseReleasedError(DENSE_RELEASED)
        self.q4 = matmul
        self.pack(self.packing)

    def forward(self, x: torch.Tensor, mask_rows: MaskRows) -> tuple[torch.Tensor, ...]:
        out = self.output(x, mask_rows)
        return out.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (out,)

    def output(self, x: torch.Tensor, mask_rows: MaskRows) -> torch.Tensor:
        """All parts' outputs side by side, (..., sum out)."""
        adapter = self.has_adapter and mask_rows is not None
        if self.q4 is not None:
            a_rows_along = adapter and self.q4_full is not None  # the A rows' outputs follow the base's
            full = (self.q4_full if a_rows_along else self.q4)(x)
            if not adapter and not self.has_bias:  # the plain step: nothing to add
                return full
            out = full[..., : self.n_out]
            if self.has_bias:
                out += self.bias[: self.n_out]
            if not adapter:
                return out
            rank = self.weight.shape[0] - self.a_start
            down = (full[..., self.n_out: self.n_out + rank] if a_rows_along
                    else linear(x, self.weight[self.a_start:], self.packed_lora_a))
        elif not adapter:
            # no adapter work: the base rows only (a prefix of the fused weight, no copy), so an AR
            # step reads no more weights than the base model does
            bias = self.bias[: self.n_out] if self.bias is not None else None
            return linear(x, self.weight[: self.n_out], self.packed_base, bias)
        else:
            full = linear(x, self.weight, self.packed_full, self.bias)
            out, down = full[..., : self.n_out], full[..., self.n_out:]
        if self.kernels and isinstance(mask_rows, int) and out.dim() == 3 and not torch.is_grad_enabled():
            kernels.lora_add_(out, down, self.lora_bt, mask_rows, self.col_bounds, self.rank_bounds)
            return out
        sel = (slice(None), slice(mask_rows, None)) if isinstance(mask_rows, int) else mask_rows
        # a column slice of `full` is strided; bf16 matmuls on a strided input take a slow path
        # on CPU (3-4x here), and a copy of a few rows x rank is cheap
        out[sel] += linear(down[sel].contiguous(), self.lora_b, self.packed_lora_b)
        return out


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by explicit position ids (HF 'rotate_half' layout).

    The sin table carries rotate_half's sign (its first half negated), so that `apply_rope` needs
    a roll instead of rotate_half's chunk, negation and concatenation: fewer ops, same bits.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        sin = emb.sin()
        sin[:, : head_dim // 2] *= -1
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, 1, T, D) so it broadcasts over heads
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half's sign already in `sin` (RotaryEmbedding)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def attention_bias(mask: torch.Tensor, width: int, group: int) -> torch.Tensor:
    """A boolean mask (B or 1, 1, T, S), True = may attend, as the additive float32 bias that
    `attention` takes: (B or 1, 1, group * T, width), -inf where masked and over slots S..width.

    Built once per forward and shared by every layer; rows are laid out as `attention` groups its
    query heads (`group` query heads per kv head).
    """
    while mask.dim() < 4:  # (T, S) or (B, T, S) broadcast like SDPA's
        mask = mask.unsqueeze(0) if mask.dim() < 3 else mask.unsqueeze(1)
    b, _, t, s = mask.shape
    bias = torch.full((b, 1, t, width), float("-inf"), device=mask.device)
    bias[..., :s].masked_fill_(mask, 0.0)
    return bias.unsqueeze(2).expand(b, 1, group, t, width).reshape(b, 1, group * t, width)


def attention(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention whose every query row comes out bit for bit the same whatever the other
    rows of the call (the engine's inference path without the compiled kernels).

    q (B, H, T, D); k_t (B, H_kv, D, S), keys transposed as the KV cache stores them; v (B, H_kv, S, D),
    with H a multiple of H_kv; bias from `attention_bias`. Returns (B, H, T, D).
    CPU SDPA splits its work by the number of queries, so in bf16 a token verified among ten
    others got different logits than the same token in a one-token AR step, and near-ties flipped.
    Plain matmuls with a float32 softmax keep each row's arithmetic independent of T.
    """
    B, H, T, D = q.shape
    h_kv = k_t.shape[1]
    # query heads sharing a kv head become extra rows of one matmul per kv head (GQA); scale and
    # bias are separate exact-rounding ops, so no fused multiply-add rounds some columns differently
    scores = torch.matmul(q.reshape(B, h_kv, H // h_kv * T, D), k_t).float()
    probs = scores.mul_(D ** -0.5).add_(bias).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, H, T, D)


class KVCache:
    """Per-layer K/V storage for up to max_len slots: keys transposed, (B, H_kv, D, capacity), values
    (B, H_kv, capacity, D). Transposed keys let the attention kernel read 16 slots per vector and
    the PyTorch path multiply q by K^T with no strided view.

    Slot s of the cache holds the token written at cache offset s. Committed tokens occupy slots
    [0, length); anything written beyond (draft and [MASK] tokens of a TiDAR step) is dropped by
    `truncate`, which only moves the length: later writes overwrite those slots, and attention
    masks every slot past the ones it is given. `valid` marks, per sequence, which slots hold
    committed tokens (left padding and ragged batch commits leave holes).

    The storage grows GROW slots at a time instead of being sliced out of a max_len buffer: the
    engine attends over the whole buffer, which is contiguous, where a slice of a larger buffer
    made every layer's batched matmuls copy K and V first (the extra slots are masked).
    """

    GROW = 64

    def __init__(self, config: TidarConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        b, h, d, n = batch_size, config.num_key_value_heads, config.head_dim, config.num_hidden_layers
        self.k = [torch.zeros(b, h, d, 0, dtype=dtype, device=device) for _ in range(n)]  # grown by `layers`
        self.v = [torch.zeros(b, h, 0, d, dtype=dtype, device=device) for _ in range(n)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def capacity(self) -> int:
        return self.v[0].shape[2]

    def _grow(self, need: int) -> None:
        size = min(self.max_len, -(-need // self.GROW) * self.GROW)
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            self.k[i] = torch.cat([k, k.new_zeros(*k.shape[:3], size - k.shape[3])], dim=3)
            self.v[i] = torch.cat([v, v.new_zeros(*v.shape[:2], size - v.shape[2], v.shape[3])], dim=2)

    def truncate(self, n: int) -> None:
        """Roll back to the first n slots; everything after is forgotten."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"cannot truncate a cache of {self.max_len} slots to {n}")
        self.valid[:, n:] = False
        self.length = n

    # -- rows joining and leaving a running batch (continuous batching) -------------------------
    # Moving a committed K/V entry to another slot or row changes nothing a query sees: positions
    # are rotated into the keys before they are stored, and the engine's attention is exact
    # whatever slots its keys sit in (see `kernels.decode_attention`).
    def select(self, rows: list[int]) -> KVCache:
        """A cache of only these rows (in this order); the slots stay where they are."""
        out = KVCache.__new__(KVCache)
        idx = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        out.k = [k.index_select(0, idx) for k in self.k]
        out.v = [v.index_select(0, idx) for v in self.v]
        out.valid, out.length, out.max_len = self.valid.index_select(0, idx), self.length, self.max_len
        return out

    def concat(self, other: KVCache) -> KVCache:
        """This cache's rows then `other`'s, over the longer of the two; a row's slots past its own
        cache's length are invalid."""
        out = KVCache.__new__(KVCache)
        out.max_len, out.length = max(self.max_len, other.max_len), max(self.length, other.length)
        cap = max(self.capacity, other.capacity)
        out.k = [torch.cat([F.pad(a, (0, cap - a.shape[3])), F.pad(b, (0, cap - b.shape[3]))])
                 for a, b in zip(self.k, other.k, strict=True)]
        out.v = [torch.cat([F.pad(a, (0, 0, 0, cap - a.shape[2])), F.pad(b, (0, 0, 0, cap - b.shape[2]))])
                 for a, b in zip(self.v, other.v, strict=True)]
        out.valid = torch.cat([F.pad(self.valid, (0, out.max_len - self.max_len)), F.pad(other.valid, (0, out.max_len - other.max_len))])
        return out

    def compact(self) -> None:
        """Move each row's committed slots to the end of the first n slots (n: the most any row
        holds), dropping the holes that ragged acceptance and departed rows leave behind."""
        counts = self.valid[:, : self.length].sum(-1)
        n = int(counts.max()) if len(counts) else 0
        # slot j of row i takes its committed entry number j - (n - count_i); earlier slots are padding
        order = torch.argsort(~self.valid[:, : self.length], dim=-1, stable=True)  # committed slots first, in order
        take = (torch.arange(n, device=counts.device)[None, :] - (n - counts)[:, None])
        valid = take >= 0
        src = order.gather(1, take.clamp(min=0)) if self.length else take.clamp(min=0)
        cap = min(max(-(-n // self.GROW) * self.GROW, self.GROW), max(self.max_len, n))
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            B, H, D, _ = k.shape
            kk = k.gather(3, src[:, None, None, :].expand(B, H, D, n))
            vv = v.gather(2, src[:, None, :, None].expand(B, H, n, D))
            self.k[i] = F.pad(kk, (0, cap - n))
            self.v[i] = F.pad(vv, (0, 0, 0, cap - n))
        self.valid.zero_()
        self.valid[:, :n] = valid
        self.length = n

    def layers(self, offset: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (K^T, V) storage, after checking that n tokens written at `offset` fit."""
        if offset + n > self.max_len:
            raise ValueError(f"KV cache full: need {offset + n} slots, have {self.max_len}")
        if offset + n > self.capacity:
            self._grow(offset + n)
        return list(zip(self.k, self.v, strict=True))


class Attention(nn.Module):
    def __init__(self, config: TidarConfig) -> None:
        super().__init__()
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.qkv: FusedLinear | None = None
        self.o: FusedLinear | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor,
                mask_rows: MaskRows, kv: tuple[torch.Tensor, torch.Tensor] | None, offset: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        fused = self.qkv is not None and not self.training
        if fused:  # q and k are adjacent columns of one output: rotate them in one go
            out = self.qkv.output(x, mask_rows)
            qk = apply_rope(out[..., : (H + H_kv) * D].view(B, T, H + H_kv, D).transpose(1, 2), cos, sin)
            q, k = qk.split([H, H_kv], dim=1)  # (B, H, T, D), (B, H_kv, T, D)
            v = out[..., (H + H_kv) * D:].view(B, T, H_kv, D).transpose(1, 2)
        else:
            q, k, v = (p(x, mask_rows) for p in (self.q_proj, self.k_proj, self.v_proj))
            q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # (B, H, T, D)
            k = apply_rope(k.view(B, T, H_kv, D).transpose(1, 2), cos, sin)
            v = v.view(B, T, H_kv, D).transpose(1, 2)
        if kv is not None:  # this layer's KV cache: write the new tokens, attend over all so far
            k_cache, v_cache = kv  # (B, H_kv, D, W), (B, H_kv, W, D)
            k_cache[..., offset:offset + T] = k.transpose(-1, -2)
            v_cache[:, :, offset:offset + T] = v
            if not fused:  # (B, H_kv, offset + T, D) each; SDPA picks its kernel by layout, so K as stored
                k, v = k_cache[..., :offset + T].transpose(-1, -2).contiguous(), v_cache[:, :, :offset + T]
        if kv is not None and fused:
            # the engine: AR and TiDAR steps must round alike; attn_mask is the forward's
            # `attention_bias` over the whole (contiguous) cache buffer
            y = attention(q, k_cache, v_cache, attn_mask).transpose(1, 2).reshape(B, T, H * D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv_head != self.n_head)
            y = y.transpose(1, 2).reshape(B, T, H * D)
        if self.o is not None and not self.training:
            return self.o(y, mask_rows)[0]
        return self.o_proj(y, mask_rows)


class MLP(nn.Module):
    def __init__(self, config: TidarConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: FusedLinear | None = None
        self.down: FusedLinear | None = None

    def forward(self, x: torch.Tensor, mask_rows: MaskRows) -> torch.Tensor:
        if self.gate_up is not None and not self.training:
            gate, up = self.gate_up(x, mask_rows)
        else:
            gate, up = self.gate_proj(x, mask_rows), self.up_proj(x, mask_rows)
        if self.down is not None and not self.training:
            return self.down(F.silu(gate) * up, mask_rows)[0]
        return self.down_proj(F.silu(gate) * up, mask_rows)


class Block(nn.Module):
    def __init__(self, config: TidarConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, mask_rows, kv, offset):  # noqa: ANN001, ANN201
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, mask_rows, kv, offset)
        return x + self.mlp(self.post_attention_layernorm(x), mask_rows)


def _run_block(block: Block, *args: object) -> torch.Tensor:
    return block(*args)


class EngineLayer(NamedTuple):
    """One decoder block as the engine's kernel path reads it: plain references taken once
    (`Transformer.use_kernels`), so a step does not pay nn.Module calls and attribute lookups per
    layer (about 3 ms of a 20 ms step at 1 row on this model's 30 layers)."""

    norm1: torch.Tensor
    qkv: Callable[[torch.Tensor, MaskRows], torch.Tensor]  # FusedLinear.output
    o: Callable[[torch.Tensor, MaskRows], torch.Tensor]
    norm2: torch.Tensor
    gate_up: Callable[[torch.Tensor, MaskRows], torch.Tensor]
    down: Callable[[torch.Tensor, MaskRows], torch.Tensor]
    eps: float
    n_head: int


def engine_layer(block: Block) -> EngineLayer:
    a, m = block.self_attn, block.mlp
    return EngineLayer(block.input_layernorm.weight, a.qkv.output, a.o.output, block.post_attention_layernorm.weight,
                       m.gate_up.output, m.down.output, block.input_layernorm.eps, a.n_head)


def engine_block(p: EngineLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                 mask_rows: MaskRows, kv: tuple[torch.Tensor, torch.Tensor], offset: int) -> torch.Tensor:
    """`Block.forward` of a cached inference step on the compiled kernels (`tidar.model.kernels`): the
    same operations, norms, RoPE with the cache writes, attention and SwiGLU each one kernel."""
    B, T, _ = x.shape
    k_cache, v_cache = kv
    q = kernels.rope_cache_(p.qkv(kernels.rms_norm(x, p.norm1, p.eps), mask_rows), cos, sin, k_cache, v_cache,
                            offset, p.n_head)
    y = kernels.decode_attention(q, k_cache, v_cache, bias, offset + T).view(B, T, -1)
    x, h = kernels.add_rms_norm(x, p.o(y, mask_rows), p.norm2, p.eps)
    return x + p.down(kernels.silu_mul(p.gate_up(h, mask_rows)), mask_rows)


def _refuse_released(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    # a state_dict of meta tensors would save nothing usable, or fail deep inside safetensors
    raise DenseReleasedError(DENSE_RELEASED)


# The projections fused for inference in each layer, in this order: (module, fused attribute, parts)
FUSED_PROJECTIONS = (("self_attn", "qkv", ("q_proj", "k_proj", "v_proj")), ("self_attn", "o", ("o_proj",)),
                     ("mlp", "gate_up", ("gate_proj", "up_proj")), ("mlp", "down", ("down_proj",)))


class Transformer(nn.Module):
    """Decoder-only LM; `forward` returns logits over the base vocabulary (never the [MASK] id)."""

    def __init__(self, config: TidarConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # [MASK] lives outside the vocabulary: a separate vector, so the base embedding table and LM
        # head keep their shapes (HF-loadable) and AR logits cannot be perturbed by it.
        self.mask_embed = nn.Parameter(torch.zeros(config.hidden_size))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self._compiled_block: object | None = None
        self._packed_head: PackedWeight | None = None
        self._was_packed = False  # packing state to restore when compiled blocks are dropped
        # the engine's layers (norms, RoPE + cache writes, attention, adapter branch) run on `tidar.model.kernels`;
        # they have no backward, so a forward with grad enabled takes the PyTorch path
        self._kernels = False
        self._engine_layers: list[EngineLayer] | None = None  # the blocks as `engine_block` runs them
        self._had_kernels = False
        self.dense_released = False  # `release_dense_base` ran: inference on the q4 path only
        if config.adapter is not None:
            self.add_adapter(config.adapter)

    @property
    def has_adapter(self) -> bool:
        return self.config.adapter is not None

    def add_adapter(self, adapter: AdapterConfig) -> None:
        """Attach LoRA branches that act only at [MASK] positions (see Linear)."""
        self.config.adapter = adapter
        layers = adapter.layers if adapter.layers is not None else range(len(self.layers))
        for i in layers:
            for name, mod in self.layers[i].named_modules():
                if isinstance(mod, Linear) and name.split(".")[-1] in adapter.targets and not hasattr(mod, "lora_a"):
                    mod.add_adapter(adapter.rank, adapter.alpha)
                    mod.to(device=mod.weight.device)

    def grow_adapter(self, rank: int, alpha: float) -> None:
        """Widen every LoRA branch to `rank` (a trained adapter, more capacity, same function at the start)."""
        have = self.config.adapter
        if have is None or rank < have.rank:
            raise ValueError(f"grow_adapter needs an adapter of rank <= {rank}, got {have and have.rank}")
        for mod in self.modules():
            if isinstance(mod, Linear) and hasattr(mod, "lora_a"):
                mod.grow_adapter(rank, alpha)
        have.rank, have.alpha = rank, alpha

    @torch.no_grad()
    def fuse_for_inference(self, pack: bool = True, use_kernels: bool = True,
                           q4: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None) -> Transformer:
        """Fuse q/k/v and gate/up projections and their adapters, (`pack`, CPU) pre-pack every
        inference weight for oneDNN, and (`use_kernels`, CPU) run the engine's layers on the
        compiled kernels (`tidar.model.kernels`) where they build. Call after the last `.to()`
        and after loading weights: the fused adapter and the packed weights are copies; training
        ignores the fused path. `q4`: each fused projection's base matmul on 4-bit blocks, in the
        order of `FUSED_PROJECTIONS` layer by layer (`fused_projections`'s); the dense base is then
        neither read nor kept (`drop_dense_base`), as after `quantize_q4_(release_dense=True)`."""
        if self.dense_released and q4 is None:
            raise DenseReleasedError(DENSE_RELEASED)
        if q4 is not None and len(q4) != len(FUSED_PROJECTIONS) * len(self.layers):
            raise ValueError(f"q4 has {len(q4)} matmuls for {len(FUSED_PROJECTIONS) * len(self.layers)} fused projections")
        matmuls = iter(q4) if q4 is not None else itertools.repeat(None)
        for layer in self.layers:
            for module, fused, parts in FUSED_PROJECTIONS:
                owner = getattr(layer, module)
                setattr(owner, fused, FusedLinear([getattr(owner, p) for p in parts], next(matmuls)))
        if q4 is not None:
            self.drop_dense_base()
        self.use_kernels(use_kernels)
        return self.pack_weights(pack)

    def fused_projections(self) -> list[tuple[int, FusedLinear | None, tuple[str, ...]]]:
        """(layer, fused projection or None before `fuse_for_inference`, its parts' names), in the order
        of `FUSED_PROJECTIONS` layer by layer."""
        return [(i, getattr(getattr(layer, module), name, None), parts)
                for i, layer in enumerate(self.layers) for module, name, parts in FUSED_PROJECTIONS]

    def base_projections(self) -> dict[str, Linear]:
        """The base projections that `FUSED_PROJECTIONS` fuse, by the names of their modules."""
        return {f"layers.{i}.{module}.{p}": getattr(getattr(layer, module), p)
                for i, layer in enumerate(self.layers) for module, _, parts in FUSED_PROJECTIONS for p in parts}

    @torch.no_grad()
    def release_dense_base(self) -> Transformer:
        """Free the dense copies of the base projections once every fused projection runs on Q4_1
        blocks (`quant.quantize_q4_`): about 210 MB of SmolLM2's 270 MB in bfloat16."""
        fused = [f for _, f, _ in self.fused_projections()]
        if not fused or any(f is None or f.q4 is None for f in fused):
            raise DenseReleasedError("release_dense_base needs every projection on the q4 path (quantize_q4_)")
        for f in fused:
            f.release_base()
        return self.drop_dense_base()

    @torch.no_grad()
    def drop_dense_base(self) -> Transformer:
        """Make the base projections' weights meta tensors (shapes kept, no storage): a model whose
        base projections run on Q4_1 blocks only (`release_dense_base`, or a loader that never read
        them). Training, saving and the dense path then raise DenseReleasedError instead of failing
        somewhere inside."""
        for part in self.base_projections().values():
            w = part.weight
            part.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)
        if not self.dense_released:
            self.dense_released = True
            self.register_state_dict_pre_hook(_refuse_released)
        return self

    def train(self, mode: bool = True) -> Transformer:
        if mode and self.dense_released:
            raise DenseReleasedError(DENSE_RELEASED)
        return super().train(mode)

    def use_kernels(self, enable: bool = True) -> bool:
        """Switch the engine between the compiled kernels (`tidar.model.kernels`, where they build and fit
        this model: CPU, float32/bfloat16, head_dim 16/32/64/128) and its PyTorch path; both are
        exact. Returns whether the kernels are on. Needs `fuse_for_inference` first."""
        p = self.embed_tokens.weight
        head_dim = self.config.head_dim
        on = (enable and self.fused and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16)
              and head_dim in (16, 32, 64, 128) and kernels.available())
        for _, fused, _ in self.fused_projections():
            fused.kernels = on and fused.n_out % 16 == 0
        self._kernels = on
        self._engine_layers = [engine_layer(layer) for layer in self.layers] if on else None
        return on

    @property
    def kernels_on(self) -> bool:
        return self._kernels

    @torch.no_grad()
    def pack_weights(self, enable: bool = True) -> Transformer:
        """Pre-pack the fused projections and the LM head (enable=False drops the packed copies)."""
        for _, fused, _ in self.fused_projections():
            if fused is not None:
                fused.pack(enable)
        self._packed_head = pack_weight(self.head_weight()) if enable else None
        return self

    @property
    def packed(self) -> bool:
        return self._packed_head is not None

    @property
    def fused(self) -> bool:
        """Whether `fuse_for_inference` ran: cached eval forwards then take the engine's path."""
        return self.layers[0].self_attn.qkv is not None

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits (in the model's dtype) for final-norm hidden states."""
        return linear(hidden, self.head_weight(), self._packed_head)

    def compile_blocks(self) -> Transformer:
        """Run each decoder block through one `torch.compile`d function (inference only).

        On a CPU a decode step of a model this small is mostly per-op overhead; inductor fuses the
        norms, RoPE and elementwise ops into a few C++ kernels. Every block has the same structure
        and its weights are graph inputs, so one graph (per step shape family) serves all layers.
        The first call compiles (tens of seconds; inductor caches on disk across processes).
        Compiled blocks use the plain weights: inductor does its own weight handling.
        """
        self._compiled_block = torch.compile(_run_block, dynamic=True)
        self._was_packed = self.packed
        self.pack_weights(False)
        self._had_kernels = self._kernels
        self.use_kernels(False)  # inductor traces PyTorch ops
        return self

    def decompile_blocks(self) -> Transformer:
        self._compiled_block = None
        if self._was_packed:
            self.pack_weights(True)
        if self._had_kernels:
            self.use_kernels(True)
        return self

    @property
    def compiled(self) -> bool:
        return self._compiled_block is not None

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The weights trained in adapter mode: LoRA branches and the [MASK] embedding."""
        return [p for n, p in self.named_parameters() if "lora_" in n or n == "mask_embed"]

    @staticmethod
    def mask_rows(is_mask: torch.Tensor) -> MaskRows:
        n = is_mask.sum(-1)
        k = int(n[0])
        if k == 0 and not bool(n.any()):
            return None
        T = is_mask.shape[1]
        if bool((n == k).all()) and bool(is_mask[:, T - k:].all()):
            return T - k
        return is_mask

    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_mask = input_ids == self.config.mask_token_id
        x = self.embed_tokens(input_ids.masked_fill(is_mask, 0))
        if is_mask.any():
            x = torch.where(is_mask.unsqueeze(-1), self.mask_embed.to(x.dtype), x)
        return x, is_mask

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B, T) or (1, T)
        attn_mask: torch.Tensor,  # bool (B or 1, 1, T, offset + T); True = may attend
        cache: KVCache | None = None,
        offset: int = 0,
        logits_index: torch.Tensor | None = None,  # positions along T to score; None = all
        return_hidden: bool = False,
    ) -> torch.Tensor:
        x, is_mask = self.embed(input_ids)
        mask_rows = self.mask_rows(is_mask) if self.has_adapter else None
        if position_ids.shape[0] != x.shape[0]:
            position_ids = position_ids.expand(x.shape[0], -1)
        cos, sin = self.rope(position_ids, x.dtype)
        kvs = cache.layers(offset, x.shape[1]) if cache is not None else [None] * len(self.layers)
        if cache is not None and self.fused and not self.training:  # the engine's attention path
            c = self.config  # the kernel maps query heads to their mask rows itself
            group = 1 if self._kernels and not torch.is_grad_enabled() else c.num_attention_heads // c.num_key_value_heads
            attn_mask = attention_bias(attn_mask, cache.capacity, group)
        # compiled only for cached inference: the engine's shapes (uncached passes are training/eval)
        use_compiled = self._compiled_block is not None and cache is not None and not self.training
        engine = self._engine_layers is not None and cache is not None and not self.training and not torch.is_grad_enabled()
        if engine:
            for layer, kv in zip(self._engine_layers, kvs, strict=True):
                x = engine_block(layer, x, cos, sin, attn_mask, mask_rows, kv, offset)
        else:
            run = self._compiled_block if use_compiled else _run_block
            for layer, kv in zip(self.layers, kvs, strict=True):
                x = run(layer, x, cos, sin, attn_mask, mask_rows, kv, offset)
        if logits_index is not None:
            x = x[:, logits_index]
        x = kernels.rms_norm(x, self.norm.weight, self.norm.eps) if engine else self.norm(x)
        if return_hidden:
            return x
        return self.head(x)  # (B, T', V)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Transformer:
        """Random initialisation for tiny test/from-scratch models."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for n, p in self.named_parameters():
            if "lora_b" in n:
                p.zero_()
            elif n.endswith("norm.weight") or "layernorm" in n:
                p.fill_(1.0)
            elif p.dim() >= 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
