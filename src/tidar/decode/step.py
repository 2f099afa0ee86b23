"""The pieces of one decoding step, as small functions on tensors.

A TiDAR step feeds the current draft d_1..d_W (causal; d_1 is already committed) plus one block of
b [MASK] tokens per pre-drafted acceptance length a (each sees the prefix and d_1..d_a). After
verification the cache keeps exactly d_1..d_a, the AR distribution after d_a gives the next
committed token (the bonus, next step's d_1), and the block drafted for the real a gives the rest
of the next draft. Batch > 1: all sequences write the same cache slots each step; a sequence that
accepted fewer tokens than the batch maximum leaves invalid slots ("holes") its mask hides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tidar.decode.drafters import Draft
from tidar.masks import StepLayout, causal_mask
from tidar.model.transformer import KVCache

FREE_ROWS = 32  # up to this many rows, one LM-head matmul over all of them costs about one over a few


def prefill_inputs(prompts: Sequence[Sequence[int]], mask_token_id: int, block_size: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts (causal) plus, for TiDAR (`block_size`), one [MASK] block that sees the
    whole prompt. Returns ids (B, T), positions (B, T), mask (B, 1, T, T) and valid (B, n_max)."""
    B, n_max = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, n_max, dtype=torch.long)
    valid = torch.zeros(B, n_max, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, n_max - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[i, n_max - len(p):] = True
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = causal_mask(n_max) & valid[:, None, None, :]
    mask |= torch.eye(n_max, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    if block_size:
        b = block_size
        ids = torch.cat([ids, torch.full((B, b), mask_token_id)], dim=1)
        pos = torch.cat([pos, valid.sum(-1)[:, None] + torch.arange(b)], dim=1)
        top = torch.cat([mask, torch.zeros(B, 1, n_max, b, dtype=torch.bool)], dim=-1)
        bottom = torch.cat([valid[:, None, None, :].expand(B, 1, b, n_max),
                            torch.ones(b, b, dtype=torch.bool).expand(B, 1, b, b)], dim=-1)
        mask = torch.cat([top, bottom], dim=2)
    return ids, pos, mask, valid


def predraft_lengths(policy: str, b: int, n_draft: int, spans: Sequence[int], sources: Sequence[str],
                     done: Sequence[bool]) -> tuple[int, ...]:
    """Acceptance lengths that get a [MASK] block this step.

    Every policy keeps a = 1: a block drafted after d_1 still covers any larger a (shifted,
    shorter), so the next step always has a draft. A draft longer than the block (a copied span)
    gets a block for its full acceptance. When every running sequence verifies a copied span longer
    than the block, or a datastore draft, the step feeds no blocks: inside a repeat the next draft
    is usually a copy again, and [MASK] rows are the expensive part of a CPU step.
    """
    running = [(k, src) for k, src, d in zip(spans, sources, done, strict=True) if not d]
    if all(k > b or src == "datastore" for k, src in running):
        return ()
    lengths = set(range(1, b + 1)) if policy == "all" else {1, b}
    if n_draft > b:
        lengths.add(n_draft)
    return tuple(sorted(a for a in lengths if a <= n_draft))


def step_inputs(drafts: torch.Tensor, lay: StepLayout, n_committed: torch.Tensor, mask_token_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and positions (B, T) of one step: the drafts, then the [MASK] blocks."""
    ids = torch.full((drafts.shape[0], lay.num_tokens), mask_token_id, dtype=torch.long)
    ids[:, : lay.n_clean] = drafts
    return ids, n_committed[:, None] + lay.position_offsets[None, :].cpu()


def commit(cache: KVCache, start: int, n_new: int, accepted: torch.Tensor) -> None:
    """Keep exactly each sequence's accepted drafts among the `n_new` slots written at `start`."""
    a_max = int(accepted.max())
    cache.valid[:, start: start + n_new] = False
    cache.valid[:, start: start + a_max] = torch.arange(a_max)[None, :] < accepted[:, None]
    cache.truncate(start + a_max)


def block_rows(lay: StepLayout, accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, b) of the [MASK] block for each sequence's acceptance length, aligned so column 0 is
    the bonus token's position, and the shift used (0 = the block drafted for exactly this a).

    A block drafted for a' <= a covers positions a' .. a'+b-1, so its last b - (a - a') rows are
    still drafts conditioned on a correct prefix; columns past its end repeat its last row (the
    drafter masks them).
    """
    b = lay.block_size
    starts = torch.tensor(lay.accept_lengths)
    ok = starts[None, :] <= accepted[:, None]  # the largest pre-drafted a' <= a (a' = 1 always exists)
    j = torch.where(ok, torch.arange(len(starts))[None, :], -1).max(-1).values.clamp(min=0)
    shift = accepted - starts[j]
    r = torch.arange(b)[None, :] + shift[:, None]
    return lay.n_clean + j[:, None] * b + r.clamp(max=b - 1), shift


def pack_drafts(bonus: torch.Tensor, drafts: Sequence[Draft]) -> tuple[torch.Tensor, list[int]]:
    """Each sequence's [bonus, d_2..] as one (B, W) tensor, and each draft's length. Shorter drafts
    are padded with token 0 (a valid proposal, one-hot when sampling, rarely accepted); the proposal
    distributions are `accept.proposals`'."""
    lengths = [1 + len(d.tokens) for d in drafts]
    B, W = len(drafts), max(lengths)
    out = torch.zeros(B, W, dtype=torch.long)
    out[:, 0] = bonus
    for i, d in enumerate(drafts):
        out[i, 1: lengths[i]] = torch.tensor(d.tokens, dtype=torch.long)
    return out, lengths


def pack_draft_logits(drafts: Sequence[Draft], width: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusion logits each packed draft token was drafted from, (B, W, V), and where there are
    such logits, (B, W) bool: column 0 (the bonus), copied tokens and padding have none."""
    logits = torch.zeros(len(drafts), width, vocab_size)
    mixable = torch.zeros(len(drafts), width, dtype=torch.bool)
    for i, d in enumerate(drafts):
        if d.logits is None:
            continue
        rows = [j for j, s in enumerate(d.sources()) if s == "diffusion"]
        logits[i, [1 + j for j in rows]] = d.logits[rows].float()
        mixable[i, [1 + j for j in rows]] = True
    return logits, mixable
