"""The compiled CPU kernels (tidar.model.kernels): right answers, and rows that do not depend on the call."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from tidar.model import kernels
from tidar.model.transformer import attention_bias

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and shutil.which("c++")) or os.environ.get("TIDAR_KERNELS") == "0",
                    reason="no C++ compiler here, or TIDAR_KERNELS=0")
def test_kernels_build_where_there_is_a_compiler():
    """Where they can be built they must be: a broken kernel source would otherwise only show up as
    skipped tests and a slower engine."""
    assert kernels.available(), kernels.unavailable_reason()


def reference_attention(q, k_t, v, mask, n_keys):  # noqa: ANN001, ANN201
    """float64 softmax attention with GQA, (B, T, H, D)."""
    g = q.shape[1] // k_t.shape[1]
    k = k_t[..., :n_keys].double().transpose(-1, -2).repeat_interleave(g, 1)
    vv = v[:, :, :n_keys].double().repeat_interleave(g, 1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask[..., :n_keys], float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(1, 2)


def random_case(seed: int, b: int, t: int, width: int, n_keys: int, d: int = 64, h: int = 6, h_kv: int = 2,
                dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(dtype)
    k_t = torch.randn(b, h_kv, d, width, generator=g).to(dtype)
    v = torch.randn(b, h_kv, width, d, generator=g).to(dtype)
    mask = torch.rand(b, 1, t, n_keys, generator=g) > 0.3  # holes, like left padding and rejected drafts
    mask[..., 0] = True  # every row sees at least one key
    return q, k_t, v, mask


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_decode_attention_matches_float64_softmax_attention(dtype, d):
    # width 70: the last 16-slot block runs past the buffer; 37 keys: a partial block of keys
    for b, t, width, n_keys in ((1, 1, 70, 37), (2, 5, 64, 64), (1, 19, 128, 100)):
        q, k_t, v, mask = random_case(b * 100 + t, b, t, width, n_keys, d=d, dtype=dtype)
        bias = attention_bias(mask, width, 1)
        out = kernels.decode_attention(q, k_t, v, bias, n_keys)
        assert out.shape == (b, t, q.shape[1], d) and out.dtype == dtype and out.is_contiguous()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), reference_attention(q, k_t, v, mask, n_keys), atol=tol, rtol=tol)


@needs_kernels
def test_decode_attention_row_is_the_same_alone_or_among_others():
    """The engine's exactness rests on this: a query row's output, bit for bit, must not depend on
    how many rows share the call, where it sits among them, or how many (masked) keys lie beyond it."""
    q, k_t, v, mask = random_case(7, 1, 24, 256, 200)
    mask = mask & torch.ones(24, 200, dtype=torch.bool).tril(176)  # causal over the last 24 keys
    together = kernels.decode_attention(q, k_t, v, attention_bias(mask, 256, 1), 200)
    for start, n in ((0, 1), (5, 1), (23, 1), (3, 4), (8, 16), (0, 24)):
        rows = slice(start, start + n)
        last_key = 177 + start + n - 1  # keys past the last row's causal range are masked for all its rows
        alone = kernels.decode_attention(q[:, :, rows], k_t, v, attention_bias(mask[:, :, rows, :last_key], 256, 1),
                                         last_key)
        assert torch.equal(alone, together[:, rows])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_depends_on_the_attended_keys_not_on_their_slots(dtype):
    """A batch leaves masked slots inside a sequence's cache (left padding, drafts rejected while
    another sequence accepted more): a row must give, bit for bit, what it gives over the same keys
    packed together, as in a batch of one (greedy TiDAR in a batch == AR alone)."""
    q, k_t, v, mask = random_case(11, 1, 6, 320, 300, dtype=dtype)
    mask[:] = torch.rand(300, generator=torch.Generator().manual_seed(3)) > 0.4  # the same holes for every row
    mask[..., 0] = True
    keep = mask[0, 0, 0].nonzero().squeeze(-1)
    n = len(keep)
    packed = kernels.decode_attention(q, k_t[..., keep], v[:, :, keep], attention_bias(mask[..., keep], n, 1), n)
    for width in (300, 320):
        assert torch.equal(kernels.decode_attention(q, k_t, v, attention_bias(mask, width, 1), 300), packed)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_add_adds_the_up_projection_on_mask_rows_only(dtype):
    g = torch.Generator().manual_seed(0)
    for n, r, row_start in ((960, 96, 7), (80, 8, 0), (3072, 64, 10)):  # 80: a 64-column block and a 16-column tail
        full = torch.randn(2, 10, n + r, generator=g).to(dtype)
        up_t = (torch.randn(r, n, generator=g) * 0.1).to(dtype)
        expect = full[..., :n].double().clone()
        expect[:, row_start:] += full[:, row_start:, n:].double() @ up_t.double()
        before = full.clone()
        kernels.lora_add_(full[..., :n], full[..., n:], up_t, row_start)
        assert torch.equal(full[:, :row_start], before[:, :row_start])  # clean rows untouched
        assert torch.equal(full[..., n:], before[..., n:])  # the input columns too
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(full[..., :n].double(), expect, atol=tol, rtol=tol)


@needs_kernels
def test_kernels_reject_bad_shapes_with_a_message():
    q, k_t, v, mask = random_case(1, 1, 2, 64, 64, d=24)
    with pytest.raises(RuntimeError, match="head_dim"):
        kernels.decode_attention(q, k_t, v, attention_bias(mask, 64, 1), 64)
    with pytest.raises(RuntimeError, match="lora_add_"):
        kernels.lora_add_(torch.zeros(1, 2, 40), torch.zeros(1, 2, 4), torch.zeros(4, 40), 0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_kernels_follow_the_reference_formula(dtype):
    from tidar.model.transformer import RMSNorm

    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(72, 1e-5).to(dtype)  # 72: a 16-lane sum plus a scalar tail
    with torch.no_grad():
        norm.weight.copy_(torch.rand(72, generator=g) + 0.5)
    x = (torch.randn(2, 5, 72, generator=g) * 3).to(dtype)
    wide = torch.randn(2, 5, 100, generator=g).to(dtype)
    delta = wide[..., 10:82]  # a column slice, as a fused projection's output is
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kernels.rms_norm(x, norm.weight, norm.eps), norm(x), **tol)
    s, y = kernels.add_rms_norm(x, delta, norm.weight, norm.eps)
    assert torch.equal(s, x + delta)  # one rounding of the float32 sum, like torch's add
    torch.testing.assert_close(y, norm(x + delta), **tol)
    # row by row: the same bits alone as among others
    row = x[:, 2:3].contiguous()
    assert torch.equal(kernels.rms_norm(row, norm.weight, norm.eps), kernels.rms_norm(x, norm.weight, norm.eps)[:, 2:3])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cache_rotates_q_and_k_and_writes_the_cache(dtype):
    from tidar.model.transformer import RotaryEmbedding, apply_rope

    g = torch.Generator().manual_seed(4)
    b, t, h, h_kv, d, width, offset = 2, 3, 4, 2, 16, 64, 9
    wide = torch.randn(b, t, (h + 2 * h_kv) * d + 8, generator=g).to(dtype)
    qkv = wide[..., 8:]  # unit last stride, wider rows
    cos, sin = RotaryEmbedding(d, 128, 10000.0)(torch.arange(offset, offset + t)[None].expand(b, -1), dtype)
    k_cache = torch.zeros(b, h_kv, d, width, dtype=dtype)
    v_cache = torch.zeros(b, h_kv, width, d, dtype=dtype)
    q = kernels.rope_cache_(qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache, offset, h)
    heads = qkv.reshape(b, t, h + 2 * h_kv, d).transpose(1, 2)  # (B, heads, T, D)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(q, apply_rope(heads[:, :h], cos, sin), **tol)
    torch.testing.assert_close(k_cache[..., offset:offset + t], apply_rope(heads[:, h:h + h_kv], cos, sin).transpose(-1, -2), **tol)
    assert torch.equal(v_cache[:, :, offset:offset + t], heads[:, h + h_kv:])
    assert not k_cache[..., :offset].any() and not v_cache[:, :, offset + t:].any()  # nothing else written


@needs_kernels
@pytest.mark.parametrize(("sizes", "garbage"), [([64, 64, 32], True), ([48, 32, 16], False)])
def test_lora_add_with_part_bounds_uses_the_block_diagonal(sizes, garbage):
    """Fused q|k|v-like parts with ranks 4, 2, 2. Where parts align with the kernel's 64-column blocks
    the ranks of other parts are not even read (garbage there changes nothing); where a block
    straddles two parts (48, 32, 16) the result is still that of the block-diagonal matrix."""
    g = torch.Generator().manual_seed(5)
    ranks = [4, 2, 2]
    n, r = sum(sizes), sum(ranks)
    up_t = torch.block_diag(*[torch.randn(rk, sz, generator=g) for sz, rk in zip(sizes, ranks, strict=True)])
    given = up_t + torch.randn(r, n, generator=g) * (up_t == 0) if garbage else up_t
    full = torch.randn(1, 6, n + r, generator=g)
    expect = full[..., :n].clone()
    expect[:, 2:] += full[:, 2:, n:] @ up_t
    col_bounds = [0, sizes[0], sizes[0] + sizes[1], n]
    kernels.lora_add_(full[..., :n], full[..., n:], given, 2, col_bounds, [0, 4, 6, 8])
    torch.testing.assert_close(full[..., :n], expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="col_bounds"):
        kernels.lora_add_(full[..., :n], full[..., n:], given, 2, col_bounds[:2], [0, 4])


@needs_kernels
def test_bfloat16_rounding_is_torchs_bit_for_bit_including_ties_and_specials():
    """The kernels round float32 sums to bfloat16 a vector at a time; `add_rms_norm`'s sum output
    shows it: nearest-even ties, infinities and overflow to inf must give torch's bits, NaN a NaN."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(4, 64, generator=g) * 4).bfloat16()
    # x + 2^-8 * x sits exactly halfway between two bfloat16 values for most x: ties both ways
    delta = (x.float() * 2 ** -8).bfloat16()
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.0e38]).bfloat16()
    delta[0, :4] = torch.tensor([1.0, -1.0, 1.0, 3.0e38]).bfloat16()
    x[1, 0], delta[1, 0] = float("inf"), float("-inf")  # inf - inf: a NaN with the sign bit set
    s, _ = kernels.add_rms_norm(x, delta, torch.ones(64, dtype=torch.bfloat16), 1e-5)
    expect = x + delta
    nan = expect.isnan()
    assert nan.sum() == 2 and torch.equal(s.isnan(), nan)  # NaN stays NaN (payloads differ among torch's own paths)
    assert torch.equal(s[~nan].view(torch.int16), expect[~nan].view(torch.int16))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_swiglus_gate_row_by_row(dtype):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(4)
    wide = (torch.randn(2, 7, 2 * 120 + 8, generator=g) * 4).to(dtype)  # 120: 16-lane blocks and a tail
    wide[0, 0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    gu = wide[..., 8:]  # a column slice, as the fused gate/up output is
    gate, up = gu[..., :120], gu[..., 120:]
    got = kernels.silu_mul(gu)
    assert got.shape == (2, 7, 120) and got.is_contiguous()
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=8e-3)  # at most an ulp
    torch.testing.assert_close(got, F.silu(gate) * up, **tol)
    assert torch.equal(kernels.silu_mul(gu[1:, 3:4]), got[1:, 3:4])  # the same bits alone as among others
    with pytest.raises(RuntimeError, match="silu_mul"):
        kernels.silu_mul(gu[..., :7])
