"""beta, the paper's "trust AR" ratio (§4.4.3): each diffusion-drafted token is verified against
beta * AR logits + (1 - beta) * the logits it was drafted from; copies against AR alone. beta = 1 is
lossless; with sampling, the committed tokens follow the mixed distribution exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_decoding import THRESHOLD, ar, chi_square, exact_two_token_dist, prompts

from tidar.decode import Decoder, GenerationConfig, generate
from tidar.decode.accept import mixed_target
from tidar.decode.drafters import Draft, Drafter, DraftPolicy
from tidar.decode.options import DIFFUSION_ONLY
from tidar.decode.sampling import warp
from tidar.masks import causal_mask, step_layout


def test_mixed_target_mixes_only_rows_drafted_by_diffusion():
    ar_logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])  # (1, W=3, V=2)
    drafted = torch.tensor([[[9.0, 9.0], [4.0, 0.0], [0.0, 8.0]]])  # column 0 (the bonus) is never read
    mixable = torch.tensor([[False, True, False]])  # d_2 by diffusion, d_3 copied
    out = mixed_target(ar_logits, drafted, mixable, 0.25)
    expected = torch.tensor([[[0.25 * 1 + 0.75 * 4, 0.25 * 0 + 0.75 * 0],  # row 0 verifies d_2: mixed
                              [0.0, 1.0],  # row 1 verifies d_3, a copy: AR alone
                              [2.0, 2.0]]])  # the row after the draft: AR alone
    torch.testing.assert_close(out, expected)
    assert mixed_target(ar_logits, drafted, mixable, 1.0) is ar_logits  # beta = 1: AR, bit for bit


@pytest.mark.parametrize("extra", [DIFFUSION_ONLY, {"lookup_ngram": 2, "policy": "full"}])
def test_beta_one_equals_ar(extra):
    model = tiny_model(seed=1)
    ps = prompts(6, seed=2)
    cfg = GenerationConfig(max_new_tokens=20, block_size=4, beta=1.0, **extra)
    assert [generate(model, [p], cfg).sequences[0] for p in ps] == [ar(model, [p], 20)[0] for p in ps]


@pytest.mark.parametrize("b", [2, 3, 4])
def test_beta_zero_greedy_accepts_every_diffusion_draft_token(b):
    model = tiny_model(seed=1)
    ps = prompts(6, seed=2)
    out = generate(model, ps, GenerationConfig(max_new_tokens=30, block_size=b, beta=0.0, **DIFFUSION_ONLY))
    stats = out.stats
    steps = sum(stats.acceptance_histogram)
    assert steps > 0 and stats.acceptance_histogram[: b - 1] == [0] * (b - 1)  # every step accepts all b
    assert stats.accepted_drafts["diffusion"] == (b - 1) * steps
    lossless = generate(model, ps, GenerationConfig(max_new_tokens=30, block_size=b, **DIFFUSION_ONLY)).sequences
    assert out.sequences != lossless  # an untrained drafter's drafts are not AR's


class WrongCopy(Drafter):
    """A one-token copy draft that is never AR's next token."""

    source, max_tokens = "lookup", 1

    def __init__(self, reference: list[int], prompt_len: int, vocab: int) -> None:
        self.reference, self.prompt_len, self.vocab = reference, prompt_len, vocab

    def propose(self, i, ctx):
        e = len(ctx.history) - self.prompt_len
        return Draft([(self.reference[e] + 1) % self.vocab] if e < len(self.reference) else [], self.source)


def test_beta_zero_still_verifies_copied_tokens_against_ar():
    """With beta = 0 a diffusion draft token always passes, but a copied one has no diffusion logits:
    it is checked against AR alone, so a wrong copy is rejected and AR's token is committed."""
    model = tiny_model(seed=1)
    for p in prompts(4, seed=3):
        ref = ar(model, [p], 16)[0]
        dec = Decoder(model, GenerationConfig(max_new_tokens=16, block_size=2, beta=0.0, **DIFFUSION_ONLY))
        dec.policy = DraftPolicy(dec.policy.diffusion, [WrongCopy(ref, len(p), model.config.vocab_size)])
        assert [t for out in dec.stream([p]) for t in out[0]] == ref
        assert dec.stats.accepted_drafts["lookup"] == 0


@torch.no_grad()
def prefill_block(model, prompt: list[int], b: int) -> torch.Tensor:
    """Logits (b, V) of the [MASK] block after `prompt`, from one cache-free forward."""
    lay = step_layout(len(prompt), b, [len(prompt)])
    ids = torch.tensor([prompt + [model.config.mask_token_id] * b])
    return model(ids, lay.position_offsets[None], lay.mask)[0, len(prompt):].float()


@torch.no_grad()
def mixed_two_token_dist(model, prompt, beta, b, **warp_kw):
    """P(t1, t2) under TiDAR with beta: t1 from AR (d_1 is AR's own token), t2 from
    warp(beta * AR after t1 + (1 - beta) * the prefill block's row for t2's position)."""
    n, V = len(prompt), model.config.vocab_size
    p1 = warp(model(torch.tensor([prompt]), torch.arange(n)[None], causal_mask(n))[0, -1], **warp_kw)
    seqs = torch.tensor([prompt + [t] for t in range(V)])
    ar2 = model(seqs, torch.arange(n + 1)[None], causal_mask(n + 1))[:, -1].float()
    drafted = prefill_block(model, prompt, b)[1]  # the prefill block sees the prompt only: d_2's logits
    return p1[:, None] * warp(beta * ar2 + (1 - beta) * drafted, **warp_kw)


def test_greedy_beta_half_commits_the_mixed_argmax_at_the_first_mismatch():
    model = tiny_model(seed=2)
    for p in prompts(12, seed=4):
        t1, t2 = generate(model, [p], GenerationConfig(max_new_tokens=2, block_size=2, beta=0.5,
                                                       **DIFFUSION_ONLY)).sequences[0]
        dist = mixed_two_token_dist(model, p, 0.5, 2)
        assert t1 == int(dist.sum(1).argmax()) and t2 == int(dist[t1].argmax())


@pytest.mark.parametrize("warp_kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=5)])
def test_sampling_with_beta_half_follows_the_mixed_distribution(warp_kw):
    model = tiny_model(seed=4, vocab_size=8)
    model.init_weights(std=0.3, seed=4)
    prompt = [1, 5, 2]
    out = generate(model, [prompt] * 4000, GenerationConfig(do_sample=True, max_new_tokens=2, seed=7, block_size=2,
                                                            beta=0.5, **DIFFUSION_ONLY, **warp_kw))
    counts = torch.zeros(8, 8)
    for s in out.sequences:
        counts[s[0], s[1]] += 1
    stat, cells = chi_square(counts, mixed_two_token_dist(model, prompt, 0.5, 2, **warp_kw))
    assert cells >= 10 and stat < THRESHOLD, stat
    # the test can tell: the same samples are far from AR's own distribution
    assert chi_square(counts, exact_two_token_dist(model, prompt, **warp_kw))[0] > 3 * THRESHOLD
    hist = out.stats.acceptance_histogram  # both the accept and the reject branch ran
    assert hist[0] > 200 and hist[1] > 200
