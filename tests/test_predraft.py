"""The pre-draft path: the [MASK] block the engine reads after an acceptance of a is the block a fresh,
cache-free forward drafts after the same committed prefix (drafts cannot change greedy output, so
only a test like this one notices a wrong block: tokens/forward would merely drop)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_decoding import OracleDecoder, ar, prompts

from tidar.decode import Decoder, GenerationConfig
from tidar.decode.drafters import Draft, Drafter, DraftPolicy
from tidar.masks import step_layout, tidar_training_mask
from tidar.model.config import AdapterConfig

B = 4


def drafter_model() -> torch.nn.Module:
    """A tiny model whose [MASK] rows run a random LoRA adapter, fused for inference like the engine's."""
    model = tiny_model(seed=1)
    model.add_adapter(AdapterConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model.fuse_for_inference().eval()


class Recorder(OracleDecoder):
    """Drafts from the AR reference (often corrupted, so every acceptance length occurs) and records
    each step's block logits with the acceptance, shift and committed length they belong to."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[int, int, int, torch.Tensor]] = []

    def _block_logits(self, hidden, lay, a, all_logits):
        logits, shift = super()._block_logits(hidden, lay, a, all_logits)
        if logits is not None and not self.state.done[0]:
            self.records.append((int(a[0]), int(shift[0]), int(self.state.n_committed[0]), logits[0].clone()))
        return logits, shift


@torch.no_grad()
def fresh_block(model, prefix: list[int]) -> torch.Tensor:
    """Logits (b, V) of one [MASK] block after `prefix`, from one forward without a cache."""
    lay = step_layout(len(prefix), B, [len(prefix)])
    ids = torch.tensor([prefix + [model.config.mask_token_id] * B])
    return model(ids, lay.position_offsets[None], lay.mask)[0, len(prefix):].float()


@pytest.mark.parametrize("policy", ["all", "full"])
def test_block_logits_after_each_acceptance_equal_a_fresh_forward(policy):
    model = drafter_model()
    seen = set()
    for p in prompts(4, seed=3):
        ref = ar(model, [p], 40)[0]
        dec = Recorder(model, GenerationConfig(max_new_tokens=40, block_size=B, policy=policy), ref, corrupt_prob=0.7)
        assert [t for out in dec.stream([p]) for t in out[0]] == ref
        full = p + ref
        for a, shift, committed, logits in dec.records:
            # the block was drafted after a' = a - shift accepted tokens: its prefix is shorter by `shift`
            expected = fresh_block(model, full[: committed - shift])
            usable = B - shift  # rows past the block's end are padding the drafter masks
            torch.testing.assert_close(logits[:usable], expected[shift:], atol=1e-4, rtol=1e-4)
            seen.add((a, shift))
    if policy == "all":  # a block for every acceptance length: never shifted
        assert {a for a, _ in seen} == set(range(1, B + 1)) and {s for _, s in seen} == {0}
    else:  # blocks for a = 1 and a = b; a = 2, 3 read the a = 1 block shifted by 1, 2
        assert {(1, 0), (2, 1), (3, 2), (4, 0)} <= seen


@torch.no_grad()
def test_the_fresh_block_is_the_training_layouts_block():
    """Where the prefix ends on a block boundary, the inference layout's block is the training
    layout's [MASK] block (the one the loss trains), logit for logit."""
    model = drafter_model()
    x = prompts(1, seed=5)[0][:8] + [1, 2, 3, 4]  # 8 clean tokens = 2 blocks, then block 3
    L = len(x)
    mask, pos = tidar_training_mask(L, B)
    ids = torch.tensor([x + [model.config.mask_token_id] * L])
    train_block = model(ids, pos[None], mask)[0, L + 8: L + 12].float()
    torch.testing.assert_close(fresh_block(model, x[:8]), train_block, atol=1e-4, rtol=1e-4)


class TruthDrafter(Drafter):
    """Proposes the AR reference's next `max_tokens` tokens, labelled `source`."""

    def __init__(self, source: str, reference: list[int], prompt_len: int, max_tokens: int) -> None:
        self.source, self.reference, self.prompt_len, self.max_tokens = source, reference, prompt_len, max_tokens

    def propose(self, i, ctx):
        e = len(ctx.history) - self.prompt_len  # tokens emitted so far, the bonus included
        return Draft(self.reference[e: e + self.max_tokens], self.source)


def test_accepted_drafts_credit_a_diffusion_tail_after_a_short_copy_to_the_diffusion_block():
    """A one-token copy overlays a three-token diffusion draft (b = 4): when all of it is accepted,
    one token is the copy's and two are the diffusion block's."""
    model = tiny_model(seed=1)
    p = prompts(1, seed=3)[0]
    ref = ar(model, [p], 60)[0]
    dec = Decoder(model, GenerationConfig(max_new_tokens=40, block_size=B, lookup_ngram=2))
    dec.policy = DraftPolicy(TruthDrafter("diffusion", ref, len(p), B - 1), [TruthDrafter("lookup", ref, len(p), 1)])
    assert [t for out in dec.stream([p]) for t in out[0]] == ref[:40]
    counts = dec.stats.accepted_drafts
    assert counts["lookup"] > 0 and counts["diffusion"] == 2 * counts["lookup"] and counts["datastore"] == 0
    assert dec.stats.tokens_per_forward > 3.5  # every draft is right: b tokens per forward, nearly
