"""Draft sources and the policy that picks a sequence's next draft.

A draft source proposes the tokens after the committed bonus token (with the distribution they were
drawn from, for the sampling rule, and its name, for the statistics). The engine verifies whatever
is proposed in the next forward, so no draft can change the output, only how many tokens a forward
commits. Adding a source means one file here with a `Drafter` and a place in `DraftPolicy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SOURCES = ("diffusion", "lookup", "datastore", "none")  # "none": no draft (the bonus token alone)


@dataclass
class Draft:
    tokens: list[int]  # d_2.. : proposed tokens after the bonus token d_1
    source: str  # where the draft starts from (what the gate and the step layout look at)
    q: torch.Tensor | None = None  # (len(tokens), V) what each token was drawn from; None = one-hot (a copy)
    token_sources: list[str] | None = None  # per token, where a combined draft differs; None = all `source`
    logits: torch.Tensor | None = None  # (len(tokens), V) the diffusion logits each token was drafted from

    def sources(self) -> list[str]:
        return self.token_sources or [self.source] * len(self.tokens)


@dataclass
class DraftContext:
    """What a source may read when proposing one sequence's next draft."""

    history: list[int]  # prompt + emitted tokens, ending with the bonus token
    block_logits: torch.Tensor | None  # (b, V) the [MASK] block for this position (row 0: the bonus), if fed
    usable_rows: int  # rows 1.. of the block that are drafts (a shifted block runs out before b - 1)


class Drafter:
    """A draft source. Sources that index the context override `add`, `extend` and `remove`.

    Sequences are named by keys that the engine keeps while rows join and leave its batch.
    """

    source = "none"
    max_tokens = 0  # the longest draft it proposes (sizes the KV cache)

    def start(self, histories: Sequence[list[int]]) -> None:
        """A new batch of these prompts, keyed 0, 1, ..."""
        self.add(range(len(histories)), histories)

    def add(self, keys: Sequence[int], histories: Sequence[list[int]]) -> None:
        """New sequences joined the batch: `histories` are their prompts."""

    def remove(self, keys: Sequence[int]) -> None:
        """These sequences left the batch."""

    def extend(self, key: int, history: list[int], start: int) -> None:
        """Sequence `key`'s history grew: `history[start:]` is new."""

    def propose(self, key: int, ctx: DraftContext) -> Draft | None:
        raise NotImplementedError


class DraftPolicy:
    """The next draft of a sequence: the diffusion block's, with the first copy draft that exists
    (prompt lookup, then the datastore) in place of its first tokens.

    A copy is verified like any draft; where it is shorter than the diffusion draft, the diffusion
    tokens past its end stay (still drafts of those positions). A step without a [MASK] block has
    no diffusion draft: the copy alone, or the bonus token alone.
    """

    def __init__(self, diffusion: Drafter | None, copies: Sequence[Drafter]) -> None:
        self.diffusion = diffusion
        self.copies = list(copies)
        self.sources = ([diffusion] if diffusion else []) + self.copies

    @property
    def max_tokens(self) -> int:
        return max((d.max_tokens for d in self.sources), default=0)

    def add(self, keys: Sequence[int], histories: Sequence[list[int]]) -> None:
        for d in self.copies:
            d.add(keys, histories)

    def remove(self, keys: Sequence[int]) -> None:
        for d in self.copies:
            d.remove(keys)

    def extend(self, key: int, history: list[int], start: int) -> None:
        for d in self.copies:
            d.extend(key, history, start)

    def observe(self, key: int, token_sources: list[str], accepted: int) -> None:
        """Sequence `key`'s last draft (d_2.., by source) was verified: its first `accepted` tokens held."""

    def draft(self, key: int, ctx: DraftContext) -> Draft:
        base = self.diffusion.propose(key, ctx) if self.diffusion and ctx.block_logits is not None else None
        for source in self.copies:
            copy = source.propose(key, ctx)
            if copy is not None and copy.tokens:
                return overlay(base, copy)
        return base or Draft([], "none")


def overlay(base: Draft | None, copy: Draft) -> Draft:
    """`copy` in place of the first tokens of `base` (a copy's proposal is one-hot)."""
    if base is None or len(base.tokens) <= len(copy.tokens):
        return copy
    k = len(copy.tokens)
    q = None
    if base.q is not None:
        q = base.q.clone()
        q[:k] = torch.nn.functional.one_hot(torch.tensor(copy.tokens), q.shape[-1]).to(q.dtype)
    return Draft(copy.tokens + base.tokens[k:], copy.source, q, copy.sources() + base.sources()[k:], base.logits)
