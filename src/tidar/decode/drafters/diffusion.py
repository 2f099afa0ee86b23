"""TiDAR's own draft: one-step diffusion on a block of [MASK] tokens, read from the same forward that
verifies the current draft (the block sees the prefix up to the accepted token, bidirectionally
within itself). Plus the gate that stops feeding [MASK] rows while their drafts do not pay."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tidar.decode.drafters import Draft, DraftContext, Drafter
from tidar.decode.sampling import dense, sample_candidates, warp_candidates

GAIN_EMA = 0.3  # weight of the newest diffusion-draft acceptance in the running gain
PROBE_EVERY = 8  # plain steps between pre-drafting probes while the gain is below min_draft_gain


class DiffusionDrafter(Drafter):
    source = "diffusion"

    def __init__(self, block_size: int, sampling: dict | None = None, generator: torch.Generator | None = None) -> None:
        """`sampling`: warp arguments (temperature, top_k, top_p) to sample drafts; None = argmax."""
        self.max_tokens = block_size - 1
        self.sampling = sampling
        self.generator = generator

    def propose(self, key: int, ctx: DraftContext) -> Draft:
        rows = ctx.block_logits[1:]  # (b - 1, V): the positions after the bonus token
        q = None
        if self.sampling is not None:
            kept = warp_candidates(rows, **self.sampling)  # drawn among the kept tokens, not the vocabulary
            picks = sample_candidates(kept, self.generator)
            q = dense(kept, rows.shape[-1])
        else:
            picks = rows.max(-1).indices  # argmax (first index on ties), faster on CPU
        # Rows past a shifted block's end have no draft: token 0 under a one-hot q (a valid
        # proposal, rarely accepted) keeps the draft the block's length.
        picks[ctx.usable_rows:] = 0
        if q is not None:
            q[ctx.usable_rows:] = torch.nn.functional.one_hot(picks[ctx.usable_rows:], q.shape[-1]).to(q.dtype)
        sources = [self.source] * ctx.usable_rows + ["none"] * (len(picks) - ctx.usable_rows)
        return Draft(picks.tolist(), self.source, q, sources, rows)


class DraftGate:
    """Pre-draft only while it pays (`min_draft_gain`): each sequence keeps a running mean of the
    diffusion-draft tokens it accepts per step beyond d_1; when every running sequence's mean is
    below the threshold, the next PROBE_EVERY steps feed no [MASK] rows, then one step probes."""

    def __init__(self, min_gain: float, block_size: int, batch: int) -> None:
        self.min_gain = min_gain
        self.b = block_size
        self.gains = [1.0] * batch
        self.plain_steps_left = 0

    @property
    def closed(self) -> bool:
        return self.plain_steps_left > 0

    def select(self, rows: list[int]) -> None:
        self.gains = [self.gains[i] for i in rows]

    def extend(self, n: int) -> None:
        self.gains += [1.0] * n

    def tick(self) -> None:
        self.plain_steps_left = max(self.plain_steps_left - 1, 0)

    def update(self, accepted: torch.Tensor, sources: Sequence[str], done: Sequence[bool]) -> None:
        seen = False
        for i, g in enumerate(self.gains):
            if sources[i] == "diffusion" and not done[i]:
                self.gains[i] = g + GAIN_EMA * (min(int(accepted[i]), self.b) - 1 - g)
                seen = True
        running = [g for g, d in zip(self.gains, done, strict=True) if not d]
        if seen and running and max(running) < self.min_gain:
            self.plain_steps_left = PROBE_EVERY
