"""The decoding engine: lossless greedy, lossless sampling, batch == alone, exact cache rollback."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from tidar.decode import Decoder, GenerationConfig, GenerationError, TextStreamer, generate
from tidar.decode.accept import speculative_accept
from tidar.decode.sampling import warp
from tidar.masks import causal_mask


def prompts(n: int, seed: int = 0, vocab: int = 97) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def ar(model, ps, n=24, **kw):
    return generate(model, ps, GenerationConfig(mode="ar", max_new_tokens=n, **kw)).sequences


def assert_tidar_equals_ar_alone_and_batched(model, ps, n=24):  # noqa: ANN001
    """Greedy TiDAR == AR for each prompt alone and for all in one ragged batch, with diffusion drafts
    (b=3, full) and with prompt lookup (b=4, all)."""
    expected = [ar(model, [p], n)[0] for p in ps]
    for cfg in (dict(block_size=3, policy="full"), dict(block_size=4, policy="all", lookup_ngram=1, lookup_tokens=6)):
        for p, exp in zip(ps, expected, strict=True):
            assert generate(model, [p], GenerationConfig(max_new_tokens=n, **cfg)).sequences[0] == exp
        assert generate(model, ps, GenerationConfig(max_new_tokens=n, **cfg)).sequences == expected


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("policy", ["all", "full"])
def test_greedy_tidar_equals_ar_on_untrained_model(block_size, policy):
    model = tiny_model(seed=block_size)
    ps = prompts(12, seed=block_size)
    expected = [ar(model, [p])[0] for p in ps]
    for p, exp in zip(ps, expected, strict=True):
        got = generate(model, [p], GenerationConfig(max_new_tokens=24, block_size=block_size, policy=policy))
        assert got.sequences[0] == exp


def test_greedy_equality_qwen2_style_model():
    model = tiny_model(seed=5, attention_bias=True, model_type="qwen2", tie_word_embeddings=False)
    for p in prompts(6, seed=9):
        assert generate(model, [p], GenerationConfig(max_new_tokens=20, block_size=3)).sequences == ar(model, [p], 20)


class OracleDecoder(Decoder):
    """Drafts the true AR continuation, corrupted at a random offset: exercises full and partial
    acceptance (incl. the all-accepted case where mask entries must not leak into the cache)."""

    def __init__(self, model, cfg, reference, corrupt_prob):
        super().__init__(model, cfg)
        self.reference = reference
        self.corrupt_prob = corrupt_prob
        self.rng = torch.Generator().manual_seed(0)

    def _next_drafts(self, st, bonus, block_logits, shift):
        super()._next_drafts(st, bonus, block_logits, shift)
        e = st.stats.generated_tokens  # the bonus is reference[e - 1]
        true = self.reference[e: e + self.b - 1]
        true = true + [0] * (self.b - 1 - len(true))
        st.drafts[0, 1:] = torch.tensor(true)
        if torch.rand(1, generator=self.rng) < self.corrupt_prob:
            k = int(torch.randint(1, self.b, (1,), generator=self.rng)) if self.b > 1 else 0
            if k:
                st.drafts[0, k] = (st.drafts[0, k] + 1) % 97


@pytest.mark.parametrize("corrupt_prob", [0.0, 0.5])
@pytest.mark.parametrize("policy", ["all", "full"])
def test_greedy_equality_with_good_drafts_and_exact_cache(corrupt_prob, policy):
    model = tiny_model(seed=1)
    for p in prompts(5, seed=3):
        ref = ar(model, [p], 40)[0]
        dec = OracleDecoder(model, GenerationConfig(max_new_tokens=40, block_size=4, policy=policy), ref, corrupt_prob)
        got = [t for step in dec.stream([p]) for t in step[0]]
        assert got == ref
        if corrupt_prob == 0.0:
            assert dec.stats.tokens_per_forward > 3.0
        # the cache holds exactly prompt + committed tokens: compare with a fresh causal prefill
        n = dec.cache.length
        committed = torch.tensor([p + ref])[:, :n]
        fresh = Decoder(model, GenerationConfig(mode="ar", max_new_tokens=1))
        from tidar.model.transformer import KVCache

        cache = KVCache(model.config, 1, n, torch.float32)
        with torch.no_grad():
            model(committed, torch.arange(n)[None], causal_mask(n), cache=cache, offset=0)
        assert dec.cache.valid[0, :n].all() and not dec.cache.valid[0, n:].any()
        for layer in range(model.config.num_hidden_layers):
            assert (dec.cache.k[layer][..., :n] - cache.k[layer]).abs().max() < 1e-5  # keys are stored transposed
            assert (dec.cache.v[layer][:, :, :n] - cache.v[layer]).abs().max() < 1e-5
        del fresh


@pytest.mark.parametrize("policy", ["all", "full"])
def test_batch_equals_alone(policy):
    model = tiny_model(seed=2)
    ps = prompts(5, seed=4)
    cfg = dict(max_new_tokens=30, block_size=3, policy=policy)
    batch = generate(model, ps, GenerationConfig(**cfg)).sequences
    alone = [generate(model, [p], GenerationConfig(**cfg)).sequences[0] for p in ps]
    assert batch == alone
    assert batch == [ar(model, [p], 30)[0] for p in ps]


def test_batch_past_max_draft_batch_decodes_as_ar_and_the_decoder_drafts_again_for_a_small_one():
    model = tiny_model(seed=2)
    ps = prompts(3, seed=6)
    cfg = GenerationConfig(max_new_tokens=20, block_size=3, max_draft_batch=2)
    expected = [ar(model, [p], 20)[0] for p in ps]
    dec = Decoder(model, cfg)
    big = [[] for _ in ps]
    for step in dec.stream(ps):
        for i, toks in enumerate(step):
            big[i].extend(toks)
    assert big == expected
    assert dec.stats.mode == "ar" and dec.stats.query_tokens == dec.stats.forwards  # one row per step
    assert dec.stats.as_dict()["mode"] == "ar"
    small = [[] for _ in ps[:2]]
    for step in dec.stream(ps[:2]):  # within the limit: TiDAR again, on the same Decoder
        for i, toks in enumerate(step):
            small[i].extend(toks)
    assert small == expected[:2]
    assert dec.stats.mode == "tidar" and dec.stats.query_tokens > 2 * dec.stats.forwards
    with pytest.raises(GenerationError, match="max_draft_batch"):
        generate(model, ps, GenerationConfig(max_draft_batch=-1))


def test_eos_ends_mid_block_like_ar():
    model = tiny_model(seed=3)
    p = prompts(1, seed=11)[0]
    ref = ar(model, [p], 30)[0]
    eos = ref[7]
    cut = ref[: ref.index(eos) + 1]
    for mode in ("ar", "tidar"):
        got = generate(model, [p], GenerationConfig(mode=mode, max_new_tokens=30, eos_token_id=[eos], block_size=4))
        assert got.sequences[0] == cut


def test_greedy_breaks_ties_toward_the_lowest_token_id(monkeypatch):
    """Tied maxima pick the lowest id in AR, in TiDAR's verification and in its diffusion drafts
    (the engine takes `max(-1).indices`, which documents the same rule as `argmax`)."""
    model = tiny_model(seed=1)
    vocab = model.config.vocab_size

    def head(hidden):  # every row: a three-way tie at the maximum
        logits = torch.zeros(*hidden.shape[:-1], vocab, dtype=hidden.dtype)
        logits[..., [60, 7, 90]] = 1.0
        return logits

    monkeypatch.setattr(model, "head", head)
    for mode in ("ar", "tidar"):
        out = generate(model, [[1, 2, 3]], GenerationConfig(mode=mode, max_new_tokens=6, block_size=3, eos_token_id=[0]))
        assert out.sequences[0] == [7] * 6


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(GenerationError):
        generate(model, [[1, 2]], GenerationConfig(max_new_tokens=0))
    with pytest.raises(GenerationError):
        generate(model, [[]], GenerationConfig())
    with pytest.raises(GenerationError):
        generate(model, [[1]], GenerationConfig(policy="nope"))
    with pytest.raises(GenerationError):
        generate(model, [[1]], GenerationConfig(max_new_tokens=10_000))


# -- sampling ------------------------------------------------------------------------------------
def exact_two_token_dist(model, prompt, **warp_kw) -> torch.Tensor:
    """p(t1, t2 | prompt) under AR sampling, computed exhaustively. (V, V)"""
    V = model.config.vocab_size
    with torch.no_grad():
        n = len(prompt)
        logits = model(torch.tensor([prompt]), torch.arange(n)[None], causal_mask(n))[0, -1]
        p1 = warp(logits, **warp_kw)
        seqs = torch.tensor([prompt + [t] for t in range(V)])
        l2 = model(seqs, torch.arange(n + 1)[None], causal_mask(n + 1))[:, -1]
        p2 = warp(l2, **warp_kw)
    return p1[:, None] * p2


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    total = counts.sum()
    expected = probs.flatten() * total
    counts = counts.flatten().double()
    big = expected >= 5
    stat = ((counts[big] - expected[big]) ** 2 / expected[big]).sum()
    rest_e, rest_c = expected[~big].sum(), counts[~big].sum()
    if rest_e > 0:
        stat += (rest_c - rest_e) ** 2 / rest_e
    return float(stat), int(big.sum())  # df ~= cells - 1


def sample_pairs(model, prompt, n, **cfg):
    out = generate(model, [prompt] * n, GenerationConfig(do_sample=True, max_new_tokens=2, seed=1234, **cfg))
    V = model.config.vocab_size
    counts = torch.zeros(V, V)
    for s in out.sequences:
        counts[s[0], s[1]] += 1
    return counts, out.stats


# chi-square 99.9% quantile for df <= 64 is below 110; a wrong rule lands in the thousands
THRESHOLD = 110.0


@pytest.mark.parametrize("warp_kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(top_p=0.9)])
def test_sampling_matches_ar_distribution(warp_kw):
    model = tiny_model(seed=4, vocab_size=8)
    model.init_weights(std=0.12, seed=4)
    prompt = [1, 5, 2]
    exact = exact_two_token_dist(model, prompt, **warp_kw)
    for mode in ("ar", "tidar"):
        counts, stats = sample_pairs(model, prompt, 4000, mode=mode, block_size=3, **warp_kw)
        stat, cells = chi_square(counts, exact)
        assert cells >= 20
        assert stat < THRESHOLD, (mode, stat)
        if mode == "tidar":  # both the accept and the reject branch were exercised
            assert stats.acceptance_histogram[0] > 200 and stats.acceptance_histogram[1] > 200


def test_sampling_test_detects_a_wrong_acceptance_rule(monkeypatch):
    model = tiny_model(seed=4, vocab_size=8)
    model.init_weights(std=0.12, seed=4)
    prompt = [1, 5, 2]
    exact = exact_two_token_dist(model, prompt)

    def accept_everything(drafts, p, q, generator):
        a, bonus = speculative_accept(drafts, p, q, generator)
        return torch.full_like(a, drafts.shape[1]), bonus

    monkeypatch.setattr("tidar.decode.engine.speculative_accept", accept_everything)
    counts, _ = sample_pairs(model, prompt, 4000, mode="tidar", block_size=3)
    stat, _ = chi_square(counts, exact)
    assert stat > 3 * THRESHOLD


def test_speculative_accept_rule_on_known_distributions():
    # p = q: every draft is accepted; q puts mass where p has none: always rejected
    V = 4
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4]] * 3])
    drafts = torch.tensor([[0, 2, 3]])
    a, _ = speculative_accept(drafts, p, p.clone(), torch.Generator().manual_seed(0))
    assert a.tolist() == [3]
    p0 = torch.tensor([[[0.0, 0.5, 0.5, 0.0]] * 3])
    q = torch.nn.functional.one_hot(torch.tensor([[0, 0, 0]]), V).float()
    a, bonus = speculative_accept(torch.tensor([[1, 0, 0]]), p0, q, torch.Generator().manual_seed(0))
    assert a.tolist() == [1] and bonus.item() in (1, 2)


# -- streaming text ------------------------------------------------------------------------------
class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_text_streamer_stops_before_stop_string():
    s = TextStreamer(CharTokenizer(), stop=["cde"])
    shown = [s.push([i]) for i in range(6)]  # a b c d e f
    assert "".join(shown) == "ab"
    assert s.stopped and s.push([7]) == ""


def test_streamed_chunks_concatenate_to_the_output():
    s = TextStreamer(CharTokenizer(), stop=["zz"])
    parts = [s.push([i]) for i in range(10)] + [s.push([], final=True)]
    assert "".join(parts) == "abcdefghij"


def test_prompt_lookup_drafts_are_lossless_and_accepted_on_repetitive_text():
    for p in prompts(6, seed=21):
        model = tiny_model(seed=12)
        ref = ar(model, [p], 60)[0]
        out = generate(model, [p], GenerationConfig(max_new_tokens=60, block_size=4, lookup_ngram=2))
        assert out.sequences[0] == ref
    # a 16-token vocabulary makes greedy text repeat its n-grams: lookup drafts must then pay
    model = tiny_model(seed=0, vocab_size=16)
    base = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=80, block_size=4))
    look = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=80, block_size=4, lookup_ngram=2))
    assert look.sequences == base.sequences == [ar(model, [[1, 2, 3]], 80)[0]]
    assert look.stats.tokens_per_forward > base.stats.tokens_per_forward


def test_long_lookup_drafts_extend_past_the_block_losslessly():
    """A copied span longer than the block is verified in one step (draft length > b): output still
    equals AR, alone and in a ragged batch whose sequences get drafts of different lengths; steps
    verifying such spans feed no [MASK] blocks."""
    model = tiny_model(seed=0, vocab_size=16)
    p = [[1, 2, 3]]
    cfg = dict(max_new_tokens=80, block_size=3, lookup_ngram=2)
    short = generate(model, p, GenerationConfig(**cfg))
    long = generate(model, p, GenerationConfig(**cfg, lookup_tokens=8))
    assert long.sequences == short.sequences == [ar(model, p, 80)[0]]
    hist = long.stats.acceptance_histogram
    assert len(hist) == 9 and sum(hist[3:]) > 0  # some steps accepted more than b tokens
    assert long.stats.tokens_per_forward > short.stats.tokens_per_forward
    assert short.stats.plain_forwards == 0 and short.stats.query_tokens_per_forward == 12  # b + b * b
    assert long.stats.plain_forwards > 0  # span steps: the span alone, no blocks
    ps = prompts(5, seed=8, vocab=16) + [[1, 2, 3]]
    for policy in ("all", "full"):
        c = GenerationConfig(**cfg, lookup_tokens=8, policy=policy)
        batch = generate(model, ps, c).sequences
        assert batch == [generate(model, [q], c).sequences[0] for q in ps] == [ar(model, [q], 80)[0] for q in ps]


def test_lookup_copies_from_the_occurrence_whose_surroundings_match_furthest_back():
    from tidar.decode.drafters import DraftContext
    from tidar.decode.drafters.lookup import LookupDrafter

    def propose(hist):
        drafter = LookupDrafter(ngram=2, max_tokens=3)
        drafter.start([hist])
        return drafter.propose(0, DraftContext(hist, None, 0))

    # the context ends in "5 1 2"; "1 2" occurred after "5" (then 7 8 ...) and, later, after "9"
    draft = propose([5, 1, 2, 7, 8, 3, 4, 6, 9, 1, 2, 3, 3, 4, 6, 10, 11, 5, 1, 2])
    assert (draft.tokens, draft.source) == ([7, 8, 3], "lookup")
    # occurrences with fewer than max_tokens after them lose to any that has them
    assert propose([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 1, 2]).tokens == [3, 4, 5]
    assert propose([1, 2, 3, 4]) is None  # "3 4" never occurred before


def test_span_steps_skip_predraft_only_when_every_sequence_has_a_span():
    from tidar.decode.step import predraft_lengths

    def lengths(spans, sources, done=(False, False), n_draft=9):
        return predraft_lengths("full", 3, n_draft, spans, sources, done)

    assert lengths([9, 5], ["lookup", "lookup"]) == ()
    assert lengths([9, 3], ["lookup", "diffusion"]) == (1, 3, 9)  # a diffusion draft needs its blocks
    assert lengths([9, 3], ["lookup", "datastore"]) == ()  # ...but a short datastore draft is a span
    assert lengths([9, 3], ["lookup", "diffusion"], done=(False, True)) == ()  # ...unless it has finished
    assert lengths([1, 1], ["none", "none"], n_draft=1) == (1,)  # after a step without blocks
    assert predraft_lengths("all", 3, 3, [3], ["diffusion"], [False]) == (1, 2, 3)


def exact_three_token_dist(model, prompt) -> torch.Tensor:
    """p(t1, t2, t3 | prompt) under AR sampling at temperature 1, computed exhaustively. (V, V, V)"""
    V = model.config.vocab_size
    p12 = exact_two_token_dist(model, prompt)
    n = len(prompt) + 2
    seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
    with torch.no_grad():
        p3 = warp(model(seqs, torch.arange(n)[None], causal_mask(n))[:, -1]).view(V, V, V)
    return p12[:, :, None] * p3


def test_prompt_lookup_with_sampling_keeps_distribution_with_long_spans():
    """Every 1-gram of this prompt recurs with a long continuation, so every draft is a span past
    the block: three tokens cover the step verifying the prefill's draft and the one verifying the
    draft built after a span step (the bonus token plus a span, without blocks)."""
    model = tiny_model(seed=4, vocab_size=4)
    model.init_weights(std=0.12, seed=4)
    prompt = [0, 1, 2, 3] * 3
    exact = exact_three_token_dist(model, prompt)
    out = generate(model, [prompt] * 4000, GenerationConfig(
        do_sample=True, max_new_tokens=3, seed=99, block_size=3, lookup_ngram=1, lookup_tokens=6))
    counts = torch.zeros(4, 4, 4)
    for s in out.sequences:
        counts[s[0], s[1], s[2]] += 1
    stat, _ = chi_square(counts, exact)
    assert stat < THRESHOLD
    assert out.stats.acceptance_histogram[0] > 0 and out.stats.forwards >= 2


def test_draft_gate_with_sampling_keeps_distribution():
    """The shipped default gates pre-drafting (min_draft_gain): with an unreachable gain, a step
    after a verified diffusion draft runs plain and the next draft is the bonus token alone. Three
    sampled tokens cover the prefill's draft, its verification and that plain step."""
    model = tiny_model(seed=4, vocab_size=4)
    model.init_weights(std=0.12, seed=4)
    prompt = [0, 3, 1]
    exact = exact_three_token_dist(model, prompt)
    out = generate(model, [prompt] * 4000, GenerationConfig(
        do_sample=True, max_new_tokens=3, seed=7, block_size=3, min_draft_gain=10.0))
    counts = torch.zeros(4, 4, 4)
    for s in out.sequences:
        counts[s[0], s[1], s[2]] += 1
    stat, _ = chi_square(counts, exact)
    assert stat < THRESHOLD
    assert out.stats.plain_forwards > 0


def test_compiled_blocks_match_eager_and_stay_lossless():
    """torch.compile'd blocks (the CPU fast path): same logits as eager up to rounding, and greedy
    TiDAR through them still equals AR, for single prompts and a ragged batch (bool mask rows)."""
    from tidar.model.config import AdapterConfig
    from tidar.model.transformer import KVCache

    model = tiny_model(seed=3)
    model.add_adapter(AdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    model.fuse_for_inference()
    ps = prompts(4, seed=11)
    expected = [ar(model, [p], 20)[0] for p in ps]

    ids = torch.tensor([ps[0] + [model.config.mask_token_id] * 4])
    n = ids.shape[1]
    mask = causal_mask(n)

    def logits() -> torch.Tensor:
        cache = KVCache(model.config, 1, n, torch.float32)
        with torch.no_grad():
            return model(ids, torch.arange(n)[None], mask, cache=cache, offset=0)

    eager = logits()
    model.compile_blocks()
    assert model.compiled
    torch.testing.assert_close(logits(), eager, atol=1e-4, rtol=1e-4)
    for p, exp in zip(ps, expected, strict=True):
        assert generate(model, [p], GenerationConfig(max_new_tokens=20, block_size=3)).sequences[0] == exp
    assert generate(model, ps, GenerationConfig(max_new_tokens=20, block_size=3)).sequences == expected
    assert ar(model, ps, 20) == expected
    model.decompile_blocks()
    assert not model.compiled


def test_draft_gate_runs_plain_steps_when_drafts_do_not_pay_and_stays_lossless():
    """min_draft_gain: once diffusion drafts commit fewer extra tokens per step than asked, steps
    feed no [MASK] rows (AR steps) and probe with a pre-draft every PROBE_EVERY steps."""
    from tidar.decode.drafters.diffusion import PROBE_EVERY

    model = tiny_model(seed=2)
    ps = prompts(4, seed=5)
    expected = [ar(model, [p], 40)[0] for p in ps]
    always = generate(model, ps[:1], GenerationConfig(max_new_tokens=40, block_size=3))
    assert always.stats.plain_forwards == 0
    gated = generate(model, ps[:1], GenerationConfig(max_new_tokens=40, block_size=3, min_draft_gain=10.0))
    assert gated.sequences[0] == expected[0]
    # an unreachable gain: every verified diffusion draft sends the next PROBE_EVERY steps plain;
    # a cycle is then the probe (pre-drafts), the step verifying it (pre-drafts, it cannot know
    # yet) and PROBE_EVERY plain steps
    masked = gated.stats.forwards - gated.stats.plain_forwards
    assert gated.stats.plain_forwards >= PROBE_EVERY
    assert masked <= 1 + 2 * (gated.stats.forwards // (PROBE_EVERY + 2) + 1)
    batch = generate(model, ps, GenerationConfig(max_new_tokens=40, block_size=3, min_draft_gain=0.5, lookup_ngram=2))
    assert batch.sequences == expected
    with pytest.raises(GenerationError):
        GenerationConfig(min_draft_gain=-1).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_with_compiled_kernels_is_lossless_and_agrees_with_pytorch_path(dtype):
    """The fused engine on tidar.model.kernels (attention, adapter branch): greedy TiDAR equals AR, alone and
    in a ragged batch (bool mask rows take the PyTorch adapter branch), with and without prompt lookup;
    its step logits are the PyTorch engine path's up to rounding (float32), and no further from the
    float32 model's than that path's are (bfloat16)."""
    from tidar.model import kernels
    from tidar.model.config import AdapterConfig
    from tidar.model.transformer import KVCache

    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")

    def build(dt: torch.dtype):  # noqa: ANN202
        model = tiny_model(seed=5, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)  # head_dim 16
        model.add_adapter(AdapterConfig(rank=16, alpha=16.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_b" in n:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        return model.to(dt).fuse_for_inference()

    model = build(dtype)
    assert model.kernels_on
    ps = prompts(4, seed=9)
    assert_tidar_equals_ar_alone_and_batched(model, ps)

    ids = torch.tensor([ps[0] + [model.config.mask_token_id] * 4])
    n = ids.shape[1]

    def logits(m, dt: torch.dtype) -> torch.Tensor:  # noqa: ANN001
        cache = KVCache(m.config, 1, n, dt)
        return m(ids, torch.arange(n)[None], causal_mask(n), cache=cache, offset=0).detach().float()

    with torch.no_grad():
        with_kernels = logits(model, dtype)
    # the kernels have no backward: a forward with grad takes the PyTorch path (with plain weights:
    # oneDNN's packed-weight op has no backward either)
    model.pack_weights(False)
    with torch.enable_grad():
        with_grad = logits(model, dtype)
    model.pack_weights(True)
    model.use_kernels(False)
    with torch.no_grad():
        without = logits(model, dtype)
    assert torch.equal(with_grad, without)
    if dtype == torch.float32:
        torch.testing.assert_close(with_kernels, without, atol=1e-4, rtol=1e-4)
    else:  # this random model is sharp enough that bf16 moves its logits by units either way
        with torch.no_grad():
            exact = logits(build(torch.float32), torch.float32)
        assert (with_kernels - exact).abs().max() <= 1.1 * (without - exact).abs().max()


def test_top_p_too_small_to_represent_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 3.0, 0.2, -1.0]])
    probs = warp(logits, top_p=1e-300)  # rounds to 0 in float32: without a floor every token would drop
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_a_temperature_too_small_to_sample_with_is_refused_with_the_way_out():
    with pytest.raises(GenerationError, match="greedy decoding"):
        GenerationConfig(do_sample=True, temperature=1e-40).validate()
    GenerationConfig(do_sample=False, temperature=1e-40).validate()  # ignored when greedy


def reference_warp(logits, temperature=1.0, top_k=None, top_p=None):
    """The warp written out as it was before the candidate search: top-k mask, then a full sort of
    every row for top-p. The sort is stable (tied tokens at the nucleus's edge in token-id order),
    the tie rule the fast warp keeps; the old unstable sort kept an arbitrary few of them."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits.softmax(-1)


@pytest.mark.parametrize("vocab", [8, 1000, 49152])
def test_fast_warp_equals_the_full_sort_on_flat_and_peaked_rows(vocab):
    g = torch.Generator().manual_seed(vocab)
    # one flat row (every token tied: the nucleus is never among the candidates), then wider to peaked ones
    scale = torch.tensor([0.0, 0.3, 1.0, 3.0, 6.0, 12.0]).view(2, 3, 1)
    for temperature in (0.7, 1.0, 1.5):
        for top_k in (None, 1, 5, 50):
            for top_p in (None, 0.1, 0.5, 0.9, 0.99, 1.0):
                logits = torch.randn(2, 3, vocab, generator=g) * scale + torch.randn(1, generator=g)
                fast, ref = warp(logits, temperature, top_k, top_p), reference_warp(logits, temperature, top_k, top_p)
                torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
                assert torch.equal(fast > 0, ref > 0), (temperature, top_k, top_p)


def test_top_p_sorts_only_the_rows_whose_nucleus_is_not_among_the_candidates(monkeypatch):
    from tidar.decode import sampling

    sorted_rows = []
    real = sampling._nucleus_by_sort
    monkeypatch.setattr(sampling, "_nucleus_by_sort", lambda rows, p: sorted_rows.append(len(rows)) or real(rows, p))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 49152, generator=g) * 8
    logits[2] = 0.0  # flat: the top 256 candidates hold 256 / 49152 of the probability
    probs = warp(logits, 0.7, top_p=0.9)
    assert sorted_rows == [1]
    torch.testing.assert_close(probs, reference_warp(logits, 0.7, top_p=0.9), atol=1e-6, rtol=0)
    assert abs(int((probs[2] > 0).sum()) - 0.9 * 49152) < 50  # the smallest set reaching 0.9 (cumsum rounds)
    sorted_rows.clear()
    warp(logits[[0, 1, 3, 4]], 0.7, top_p=0.9)
    assert sorted_rows == []  # peaked rows never sort


def test_top_p_keeps_tied_tokens_at_the_nucleus_edge_in_token_id_order():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    tied = [40, 3, 700, 20]
    logits[:, tied] = 20.0  # four tokens of nearly 1/4 each: top_p 0.3 keeps two of them
    for bf16 in (False, True):
        probs = warp(logits.bfloat16() if bf16 else logits, top_p=0.3)
        assert (probs > 0).nonzero()[:, 1].view(3, 2).tolist() == [[3, 20]] * 3
        torch.testing.assert_close(probs[:, [3, 20]], torch.full((3, 2), 0.5))


def test_bf16_logits_with_many_ties_warp_as_the_full_sort():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 8, 49152, generator=g) * 4).bfloat16()  # bfloat16: ties everywhere
    for top_k, top_p in ((None, 0.5), (None, 0.9), (50, 0.9), (1000, 0.99)):
        fast, ref = warp(logits, 0.7, top_k, top_p), reference_warp(logits, 0.7, top_k, top_p)
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)
        assert torch.equal(fast > 0, ref > 0)
