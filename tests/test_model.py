"""Model: parity with transformers on tiny random Llama/Qwen2, and the static KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tidar.masks import causal_mask, with_prefix
from tidar.model.config import TidarConfig
from tidar.model.transformer import KVCache
from tidar.model.weights import load_model, save_pretrained


def _hf_model(kind: str, tmp_path):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=5000.0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=20000.0, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # biases too: Qwen2's qkv bias must be exercised
    model.eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_transformers(kind, tmp_path):
    hf = _hf_model(kind, tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.model_type == kind
    assert ours.config.attention_bias == (kind == "qwen2")
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, torch.arange(17)[None], causal_mask(17))
    assert (got - expected).abs().max() < 1e-4


def test_our_checkpoint_opens_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model()
    save_pretrained(model, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    reloaded = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, torch.arange(9)[None], causal_mask(9))
        assert (hf(ids).logits - ours).abs().max() < 1e-4
        assert torch.equal(reloaded(ids, torch.arange(9)[None], causal_mask(9)), ours)
    assert torch.equal(reloaded.mask_embed, model.mask_embed)


def _step(model, cache, ids, offset):
    T = ids.shape[1]
    mask = with_prefix(causal_mask(T), cache.valid[:, :offset])
    out = model(ids, torch.arange(offset, offset + T)[None], mask, cache=cache, offset=offset)
    cache.valid[:, offset:offset + T] = True
    cache.truncate(offset + T)
    return out


@torch.no_grad()
def test_kv_cache_equals_recompute_including_rollback():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 97, (1, 24), generator=g)
    full = model(seq, torch.arange(24)[None], causal_mask(24))
    cache = KVCache(model.config, 1, 64, torch.float32)
    _step(model, cache, seq[:, :10], 0)
    # write junk that must leave no trace after rollback (a rejected draft)
    junk = torch.randint(0, 97, (1, 7), generator=g)
    _step(model, cache, junk, 10)
    cache.truncate(10)
    outs = [_step(model, cache, seq[:, i:i + 1], i) for i in range(10, 16)]
    outs.append(_step(model, cache, seq[:, 16:], 16))
    got = torch.cat(outs, dim=1)
    assert (got - full[:, 10:]).abs().max() < 1e-4  # float32 reduction order differs


def test_config_roundtrip_and_errors(tmp_path):
    cfg = TidarConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    cfg.save(tmp_path)
    again = TidarConfig.load(tmp_path)
    assert again.hidden_size == 8 and again.mask_token_id == 10 and again.head_dim == 4
    with pytest.raises(ValueError, match="multiple"):
        TidarConfig(num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(ValueError, match="no config.json"):
        TidarConfig.load(tmp_path / "missing")


@torch.no_grad()
def test_fused_projections_match_unfused_with_adapter(tmp_path):
    from tidar.masks import tidar_training_mask
    from tidar.model.config import AdapterConfig

    model = tiny_model(attention_bias=True)
    model.add_adapter(AdapterConfig(rank=4))
    for n, p in model.named_parameters():
        if "lora_b" in n:
            p.normal_(0, 0.3)
    mask, pos = tidar_training_mask(8, 4)
    ids = torch.cat([torch.randint(0, 97, (2, 8)), torch.full((2, 8), model.config.mask_token_id)], 1)
    expected = model(ids, pos[None], mask)
    model.fuse_for_inference()
    got = model(ids, pos[None], mask)
    assert (got - expected).abs().max() < 1e-5
    save_pretrained(model, tmp_path / "fused")  # shared-storage views must still save
    assert torch.equal(load_model(tmp_path / "fused").layers[0].self_attn.k_proj.weight,
                       model.layers[0].self_attn.k_proj.weight)


def test_save_load_round_trip_and_generate(tmp_path):
    from tidar.decode import GenerationConfig, generate

    model = tiny_model()
    save_pretrained(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    ids = [[3, 1, 4, 1, 5]]
    out = generate(again, ids, GenerationConfig(max_new_tokens=6, mode="tidar", block_size=3)).sequences
    assert out == generate(model, ids, GenerationConfig(max_new_tokens=6, mode="ar")).sequences and len(out[0]) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_unpacked_logits(dtype):
    """oneDNN-packed inference weights (the CPU fast path) compute what plain F.linear does: bit
    for bit in bfloat16, to rounding in float32; with adapter rows as a suffix and as a bool mask."""
    from tidar.model.config import AdapterConfig
    from tidar.model.transformer import KVCache, pack_weight

    model = tiny_model(attention_bias=True)
    model.add_adapter(AdapterConfig(rank=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.3)
    model = model.to(dtype).fuse_for_inference(pack=False)
    assert not model.packed
    if pack_weight(model.head_weight()) is None:
        pytest.skip("this torch build cannot pack weights for oneDNN")
    m = model.config.mask_token_id
    suffix = torch.tensor([[5, 7, 9, m, m], [1, 2, 3, m, m]])
    scattered = torch.tensor([[5, m, 9, m, 4], [1, 2, m, m, 3]])
    mask = torch.ones(5, 5, dtype=torch.bool)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        cache = KVCache(model.config, 2, 5, dtype)
        with torch.no_grad():
            return model(ids, torch.arange(5)[None], mask, cache=cache, offset=0).float()

    plain = [logits(ids) for ids in (suffix, scattered)]
    model.pack_weights()
    assert model.packed and model.layers[0].mlp.gate_up.packed_lora_b is not None
    for ids, expected in zip((suffix, scattered), plain, strict=True):
        got = logits(ids)
        if dtype == torch.bfloat16:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    model.pack_weights(False)
    assert not model.packed and model.layers[0].mlp.gate_up.packed_full is None


def test_weights_that_cannot_be_packed_fall_back_to_plain_linear(monkeypatch):
    from tidar.model.transformer import pack_weight

    def broken(*_args, **_kwargs):
        raise RuntimeError("no oneDNN kernel for this dtype on this CPU")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
    assert pack_weight(torch.randn(8, 4)) is None
    model = tiny_model().fuse_for_inference()
    assert not model.packed  # and it still runs, through F.linear
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids, torch.arange(3)[None], causal_mask(3)).shape == (1, 3, model.config.vocab_size)
    assert pack_weight(torch.randn(8, 4, dtype=torch.float16)) is None  # not a packable dtype here


def test_packed_bf16_matmul_rows_do_not_depend_on_the_call():
    """Wide bf16 inputs (SmolLM2's 1536-wide down projection) summed in one oneDNN call round some
    outputs differently for 1 row than among 8+; the chunked packed weight must not."""
    from tidar.model.transformer import MAX_PACKED_K, linear, pack_weight

    k = 1536
    assert k > MAX_PACKED_K
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(576, k, generator=g) * 0.05).bfloat16()
        packed = pack_weight(w)
        if packed is None:
            pytest.skip("this torch build cannot pack weights for oneDNN")
        assert len(packed.chunks) == 2
        x = torch.randn(1, 24, k, generator=g).bfloat16()
        together = linear(x, w, packed)
        alone = torch.cat([linear(x[:, i:i + 1], w, packed) for i in range(24)], dim=1)
        assert torch.equal(together, alone)
        torch.testing.assert_close(together.float(), torch.nn.functional.linear(x, w).float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "pytorch"])
def test_bf16_cached_step_logits_are_those_of_one_token_steps(use_kernels):
    """The engine's bf16 exactness: a token's logits in a multi-token cached step (drafts + [MASK]
    rows after it) equal, bit for bit, its logits in one-token AR steps, so greedy TiDAR cannot
    flip a near-tie. SDPA broke this for 10+ query rows on this CPU. Both engine paths: the compiled
    kernels (tidar.model.kernels) and plain PyTorch."""
    from tidar.model.config import AdapterConfig

    model = tiny_model(seed=3, intermediate_size=1536, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    model.add_adapter(AdapterConfig(rank=4))
    model = model.to(torch.bfloat16).fuse_for_inference(use_kernels=use_kernels)
    if not model.packed:
        pytest.skip("this torch build cannot pack weights for oneDNN")
    if model.kernels_on != use_kernels:
        pytest.skip("the compiled kernels are unavailable here")
    # the prompt ends 8 slots before a KV-cache growth boundary: the 18-row step attends over a
    # wider (masked) buffer than the first one-token steps, which must not change a bit either
    n = KVCache.GROW - 8
    prompt = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(1))
    new = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    m = model.config.mask_token_id

    def prefilled() -> KVCache:
        cache = KVCache(model.config, 1, n + 40, torch.bfloat16)
        with torch.no_grad():
            model(prompt, torch.arange(n)[None], causal_mask(n), cache=cache, offset=0)
        cache.valid[:, :n] = True
        cache.truncate(n)
        return cache

    cache = prefilled()
    step = torch.cat([new, torch.full((1, 6), m)], dim=1)  # 12 drafts, then [MASK] rows they cannot see
    mask = torch.zeros(18, 18, dtype=torch.bool)
    mask[:12, :12] = causal_mask(12)
    mask[12:, :] = True
    with torch.no_grad():
        together = model(step, torch.arange(n, n + 18)[None], with_prefix(mask, cache.valid[:, :n]), cache=cache,
                         offset=n)
    assert cache.capacity > KVCache.GROW
    cache = prefilled()
    alone = []
    with torch.no_grad():
        for i in range(12):
            alone.append(model(new[:, i:i + 1], torch.tensor([[n + i]]), with_prefix(torch.ones(1, 1, dtype=torch.bool),
                               cache.valid[:, :n + i]), cache=cache, offset=n + i))
            cache.valid[:, n + i] = True
            cache.truncate(n + i + 1)
    assert torch.equal(together[:, :12], torch.cat(alone, dim=1))


def test_kv_cache_grows_in_steps_and_keeps_its_contents():
    model = tiny_model()
    cache = KVCache(model.config, 2, 150, torch.float32)
    assert cache.capacity == 0
    (k, v), *_ = cache.layers(0, 10)
    assert cache.capacity == KVCache.GROW
    k[..., :10] = 7.0  # keys are stored transposed: (B, H_kv, D, slots)
    v[:, :, :10] = 5.0
    (k, v), *_ = cache.layers(10, KVCache.GROW)  # crosses the boundary: copied into a larger buffer
    assert cache.capacity == 2 * KVCache.GROW and k.shape[-1] == v.shape[2] == 2 * KVCache.GROW
    assert torch.all(k[..., :10] == 7.0) and not k[..., 10:].any() and k.is_contiguous()
    assert torch.all(v[:, :, :10] == 5.0) and not v[:, :, 10:].any() and v.is_contiguous()
    cache.layers(140, 10)
    assert cache.capacity == 150  # never beyond max_len
    with pytest.raises(ValueError, match="KV cache full"):
        cache.layers(145, 6)


def test_fused_rms_norm_and_rolled_rope_round_like_the_reference_formulas():
    """RMSNorm uses torch's fused kernel and RoPE a roll with a signed sin table: both must give
    the bits of HF Llama's formulas, in float32 and bfloat16 (the AR path stays the base model)."""
    from tidar.model.transformer import RMSNorm, RotaryEmbedding, apply_rope

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(96, 1e-5).to(dtype)
        norm.weight.data = torch.randn(96, generator=g).to(dtype)
        x = (torch.randn(2, 7, 96, generator=g) * 3).to(dtype)
        ref = x.float()
        ref = norm.weight * (ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        assert torch.equal(norm(x), ref)

        rope = RotaryEmbedding(16, 64, 10000.0)
        pos = torch.randint(0, 64, (2, 7), generator=g)
        cos, sin = rope(pos, dtype)
        q = torch.randn(2, 3, 7, 16, generator=g).to(dtype)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
        emb = torch.cat([pos[..., None].float() * inv_freq] * 2, dim=-1)[:, None]
        half = torch.cat((-q[..., 8:], q[..., :8]), dim=-1)  # HF's rotate_half
        assert torch.equal(apply_rope(q, cos, sin), q * emb.cos().to(dtype) + half * emb.sin().to(dtype))
