"""The base projections on the GGUF's own Q4_1 blocks instead of dense bfloat16 copies.

SmolLM2's GGUF stores every attention and MLP projection as Q4_1: per 32 inputs of an output row a
float16 scale d and minimum m and 32 4-bit codes q, the weight being d * q + m (the embedding/LM
head is Q8_0 and the norms float32; those stay dense). `quantize_q4_` swaps a fused model's
projections to a matmul that reads those blocks (`csrc/q4_kernels.cpp`): 4.5 bits a weight instead
of 16, each weight equal to gguf.quants.dequantize's float32 value, and each row's output independent
of the other rows of the call, so greedy TiDAR still equals AR on this path. The adapter's [MASK]-row
projections stay dense.

On bfloat16 inputs the kernel multiplies on the CPU's AMX tiles where it has them (Intel Sapphire
Rapids and later; `TIDAR_Q4_AMX=0` turns it off): per group of 32 inputs d * sum(x q) + m * sum(x),
so a step's extra rows cost a few tile instructions instead of 64 vector fmas per group (a 3072 x 576
projection at 16 rows: 122 vs 290 us, benchmarks/results/q4-rows-amx-2026-12-06.log). Every bfloat16
call takes the same path, so rows stay independent of the call.

PyTorch's own CPU int4 kernel (`torch.ops.aten._weight_int4pack_mm_for_cpu`, used by `to_int4pack`
for comparison) does not fit: its fast path takes scales and zeros in the activations' dtype, and
bfloat16 scales move 86% of SmolLM2's weights off the GGUF's values; its float32 path is exact but
about ten times slower (benchmarks/int4_linear.py).

The kernel is compiled like `tidar.model.kernels` (once, cached; `TIDAR_KERNELS=0` disables it).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tidar.model import kernels
from tidar.model.transformer import Transformer

GROUP = 32  # inputs per Q4_1 block
BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of 4-bit codes
OUT_BLOCK = 32  # outputs per kernel block: a projection's output size must be a multiple
SOURCE = Path(__file__).parent / "csrc" / "q4_kernels.cpp"
# our part name -> the GGUF tensor of layer i
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


class QuantError(ValueError):
    """Weights that cannot take the Q4_1 path."""


@functools.cache
def unavailable_reason() -> str | None:
    """Why the Q4_1 kernel is not loaded, or None when it is (builds it on the first call)."""
    return kernels.build_extension("tidar_q4", SOURCE)


def available() -> bool:
    return unavailable_reason() is None


def amx() -> bool:
    """Whether bfloat16 inputs take the kernel's AMX path (see csrc/q4_kernels.cpp)."""
    return available() and bool(torch.ops.tidar_q4.amx())


def q4_1_fields(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 bytes (N, K/32 * 20) -> d, m float16 (N, K/32) and codes q uint8 (N, K)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n, width = raw.shape
    if width % BLOCK_BYTES:
        raise QuantError(f"a Q4_1 row is a whole number of {BLOCK_BYTES}-byte blocks, got {width} bytes")
    blocks = torch.from_numpy(raw.reshape(n, width // BLOCK_BYTES, BLOCK_BYTES).copy())
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]
    qs = blocks[..., 4:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, -1)  # a block's low nibbles are its inputs 0..15
    return d, m, q


def dequantize_q4_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float32 (N, K): d * q + m, rounded as gguf.quants.dequantize rounds (product, then sum)."""
    n, k = q.shape
    w = d.float()[..., None] * q.view(n, k // GROUP, GROUP).float() + m.float()[..., None]
    return w.reshape(n, k)


def quantize_q4_1(weight: torch.Tensor) -> np.ndarray:
    """Q4_1 bytes of an (N, K) weight by gguf's reference quantizer (llama.cpp's)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if weight.shape[-1] % GROUP:
        raise QuantError(f"Q4_1 needs input sizes that are multiples of {GROUP}, got {tuple(weight.shape)}")
    return quantize(weight.detach().float().cpu().numpy(), GGMLQuantizationType.Q4_1)


@dataclass
class Q4Weight:
    """An (N, K) Q4_1 weight in the kernel's layout; calling it computes x @ W^T (x float32 or bfloat16).

    qw uint8 (N/32, K, 16): byte j of output block b, input k, holds q[32b + j, k] (low nibble) and
    q[32b + 16 + j, k] (high nibble); dm float16 (N/32, K/32, 2, 32): d then m of the block's outputs.
    """

    qw: torch.Tensor
    dm: torch.Tensor
    amx: bool = True  # bfloat16 inputs on the AMX tiles where present (False: the fma path, for A/Bs)
    extra: torch.Tensor | None = None  # dense rows computed in the same call (`with_rows`), pair layout

    @property
    def shape(self) -> tuple[int, int]:
        return self.qw.shape[0] * OUT_BLOCK, self.qw.shape[1]

    @classmethod
    def from_fields(cls, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> Q4Weight:
        n, k = q.shape
        if n % OUT_BLOCK or k % GROUP:
            raise QuantError(f"the Q4_1 kernel takes (N, K) multiples of ({OUT_BLOCK}, {GROUP}), got ({n}, {k})")
        q = q.to(torch.uint8).view(n // OUT_BLOCK, 2, OUT_BLOCK // 2, k)
        qw = (q[:, 0] | (q[:, 1] << 4)).transpose(1, 2).contiguous()
        g = k // GROUP
        dm = torch.stack([d.reshape(n // OUT_BLOCK, OUT_BLOCK, g), m.reshape(n // OUT_BLOCK, OUT_BLOCK, g)], 1)
        return cls(qw, dm.permute(0, 3, 1, 2).to(torch.float16).contiguous())

    @classmethod
    def from_blocks(cls, raw: np.ndarray) -> Q4Weight:
        """From GGUF Q4_1 bytes, (N, K/32 * 20)."""
        return cls.from_fields(*q4_1_fields(raw))

    def fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """d, m (N, K/32) and q (N, K), as `q4_1_fields` gives them."""
        n, k = self.shape
        q = torch.stack([self.qw & 0xF, self.qw >> 4], 1).transpose(2, 3).reshape(n, k)
        dm = self.dm.permute(0, 2, 3, 1)  # (N/32, 2, 32, G)
        return dm[:, 0].reshape(n, -1), dm[:, 1].reshape(n, -1), q

    def dequantize(self) -> torch.Tensor:
        return dequantize_q4_1(*self.fields())

    def with_rows(self, rows: torch.Tensor) -> Q4Weight | None:
        """This matmul followed, in the same call, by x @ rows^T for dense bfloat16 `rows` (R, K): the
        adapter's A rows beside the base projection, one kernel call instead of two (a separate small
        matmul costs about 60 us on this CPU, whatever its size). The output has N + R' columns, R'
        being R rounded up to a multiple of 32 (zeros after R); the base outputs are the same bits as
        without. On the AMX path only: None elsewhere (and for float32 rows)."""
        r, k = rows.shape
        if not (self.amx and amx() and k == self.shape[1] and rows.dtype == torch.bfloat16):
            return None
        padded = torch.cat([rows, rows.new_zeros(-r % OUT_BLOCK, k)])
        packed = padded.view(-1, 2, OUT_BLOCK // 2, k // 2, 2).permute(0, 3, 1, 2, 4).contiguous()
        return dataclasses.replace(self, extra=packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tidar_q4.linear(x, self.qw, self.dm, self.amx, self.extra)


def to_int4pack(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU int4 layout for `int4pack_linear`: packed codes and scales_and_zeros (K/32, N, 2).
    Its kernel dequantizes (q - 8) * scale + zero, so zero = m + 8d; in `dtype`, which is the activations'."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    zero = m.float() + 8 * d.float()
    return packed, torch.stack([d.float(), zero], -1).transpose(0, 1).to(dtype).contiguous()


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W^T through `torch.ops.aten._weight_int4pack_mm_for_cpu`, group size 32."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)


def _unpermute_rows(raw: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of each q/k head; undo it (transformers
    # does the same when it loads a GGUF). Rows are output features, so whole Q4_1 blocks move.
    dim = raw.shape[0] // n_head // 2
    return raw.reshape(n_head, dim, 2, *raw.shape[1:]).swapaxes(2, 1).reshape(raw.shape)


def gguf_blocks(reader: object, layer: int, part: str, model: Transformer) -> np.ndarray:
    """The Q4_1 bytes of one projection of layer `layer` in a GGUFReader, rows in our model's order."""
    name = f"blk.{layer}.{GGUF_NAMES[part]}.weight"
    tensor = next((t for t in reader.tensors if t.name == name), None)  # type: ignore[attr-defined]
    if tensor is None:
        raise QuantError(f"{name} is not in the GGUF")
    if tensor.tensor_type.name != "Q4_1":
        raise QuantError(f"{name} is {tensor.tensor_type.name}, not Q4_1")
    raw = np.asarray(tensor.data)
    c = model.config
    if c.model_type == "llama" and part in ("q_proj", "k_proj"):
        raw = _unpermute_rows(raw, c.num_attention_heads if part == "q_proj" else c.num_key_value_heads)
    return raw


@torch.no_grad()
def quantize_q4_(model: Transformer, source: object | str | Path | None = None,
                 release_dense: bool = False) -> Transformer:
    """Run every attention and MLP projection of a fused model (`fuse_for_inference`) on Q4_1 blocks.

    `source`: a GGUF path or `gguf.GGUFReader` (SmolLM2's: `weights.smollm2_gguf_path()`), whose
    blocks are used as they are; None quantizes the model's own weights (gguf's reference Q4_1
    quantizer). The dense base weights are overwritten with the blocks' values (in the model's
    dtype), so the unfused and training paths compute with the same weights, rounded; the LoRA
    branches and the LM head stay dense. `release_dense`: free the dense base weights instead
    (`Transformer.release_dense_base`; an inference-only model, about 210 MB less for SmolLM2).
    Returns the model.
    """
    if not model.fused:
        raise QuantError("quantize_q4_ needs a fused model: call model.fuse_for_inference() first")
    if model.compiled:  # inductor traces PyTorch ops; the Q4_1 kernel has no fake (meta) implementation
        raise QuantError("quantize_q4_ runs on eager blocks: call model.decompile_blocks() first")
    if not available():
        raise QuantError(f"the Q4_1 kernel is unavailable ({unavailable_reason()})")
    if isinstance(source, (str, Path)):
        from gguf import GGUFReader

        source = GGUFReader(source)
    for i, fused, parts in model.fused_projections():
        layer = model.layers[i]
        raws = [gguf_blocks(source, i, p, model) if source is not None
                else quantize_q4_1(getattr(layer.self_attn if hasattr(layer.self_attn, p) else layer.mlp, p).weight)
                for p in parts]
        if [r.shape[0] for r in raws] != fused.sizes:
            raise QuantError(f"layer {i} {'/'.join(parts)}: the GGUF has {[r.shape[0] for r in raws]} outputs, "
                             f"the model {fused.sizes}")
        weight = Q4Weight.from_blocks(np.concatenate(raws))
        if weight.shape[1] != fused.weight.shape[1]:
            raise QuantError(f"layer {i} {'/'.join(parts)}: {weight.shape[1]} inputs in the GGUF, {fused.weight.shape[1]} in the model")
        if not release_dense:
            fused.weight[: fused.n_out].copy_(weight.dequantize().to(fused.weight.dtype))
        fused.use_q4(weight)
    return model.release_dense_base() if release_dense else model
