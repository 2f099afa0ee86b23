"""Baselines: speculative decoding is lossless; block diffusion decodes with the same weights."""

from __future__ import annotations

import torch
from conftest import tiny_model
from test_decoding import ar, prompts

from tidar.decode import GenerationConfig
from tidar.measure.baselines import diffusion_generate, spec_generate, truncated_draft


def test_spec_greedy_equals_ar_with_truncated_and_perfect_drafts():
    model = tiny_model(seed=6, num_hidden_layers=3)
    for draft in (truncated_draft(model, 1), model):  # the target drafting for itself accepts everything
        for p in prompts(4, seed=6):
            out = spec_generate(model, draft, [p], GenerationConfig(max_new_tokens=25), gamma=3)
            assert out.sequences[0] == ar(model, [p], 25)[0]
    assert out.stats.tokens_per_forward > 3.5  # perfect drafts: gamma + 1 tokens per target forward


def test_diffusion_baseline_runs_and_respects_limits():
    model = tiny_model(seed=7)
    for threshold in (1.01, 0.0):  # one token per forward / a whole block per forward
        out = diffusion_generate(model, prompts(2, seed=1), GenerationConfig(max_new_tokens=10), threshold=threshold)
        assert [len(s) for s in out.sequences] == [10, 10]
        # 10 tokens = 3 blocks of 4 per prompt: 12 forwards each at one token per forward, 3 at a block
        assert out.stats.forwards == (2 * 12 if threshold > 1 else 2 * 3)


def test_diffusion_block_is_greedy_one_step_draft():
    # threshold 0 unmasks the whole block at once: it must equal the argmax of a one-step draft
    model = tiny_model(seed=8)
    p = prompts(1, seed=2)[0]
    out = diffusion_generate(model, [p], GenerationConfig(max_new_tokens=4), threshold=0.0, block_size=4)
    from tidar.masks import step_layout

    n, b = len(p), 4
    lay = step_layout(n, b, [n])
    ids = torch.tensor([p + [model.config.mask_token_id] * b])
    with torch.no_grad():
        logits = model(ids, lay.position_offsets[None], lay.mask)
    assert out.sequences[0] == logits[0, n:].argmax(-1).tolist()
