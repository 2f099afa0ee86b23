"""The explicit state of one batch being decoded: cache, committed lengths, current drafts, and
what each sequence has emitted."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tidar.decode.drafters.diffusion import DraftGate
from tidar.decode.stats import GenerationStats
from tidar.model.transformer import KVCache


@dataclass
class BatchState:
    cache: KVCache
    n_committed: torch.Tensor  # (B,) tokens of each sequence in the cache = the position of its next token
    histories: list[list[int]]  # prompt + emitted tokens, per sequence (copy drafts read them)
    eos: set[int]
    max_new_tokens: int
    stats: GenerationStats
    gate: DraftGate | None = None  # None: [MASK] blocks are fed whenever drafting (min_draft_gain 0)
    drafts: torch.Tensor | None = None  # (B, W): d_1 (committed, the bonus) then d_2..d_W to verify
    q: torch.Tensor | None = None  # (B, W, V) the distributions d_2.. were drawn from (sampling only)
    # (B, W, V) diffusion logits d_2.. were drafted from, and (B, W) where they exist (beta < 1 only)
    draft_logits: tuple[torch.Tensor, torch.Tensor] | None = None
    sources: list[str] = field(default_factory=list)  # where each sequence's d_2.. came from
    lengths: list[int] = field(default_factory=list)  # each sequence's draft length (bonus included), padding aside
    token_sources: list[list[str]] = field(default_factory=list)  # per sequence, where each of d_2.. came from
    done: list[bool] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        B = len(self.histories)
        self.done = [False] * B
        self.emitted = [0] * B
        self.sources = ["none"] * B
        self.lengths = [1] * B
        self.token_sources = [[] for _ in range(B)]

    @property
    def running(self) -> list[int]:
        return [i for i, d in enumerate(self.done) if not d]

    def set_drafts(self, drafts: torch.Tensor, q: torch.Tensor | None, sources: list[str], lengths: list[int],
                   token_sources: list[list[str]], draft_logits: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> None:
        self.drafts, self.q, self.sources, self.lengths, self.token_sources = drafts, q, sources, lengths, token_sources
        self.draft_logits = draft_logits

    def accepted_sources(self, i: int, accepted: int) -> list[str]:
        """Where sequence i's accepted draft tokens d_2..d_a came from ("none": batch padding)."""
        known = self.token_sources[i][: accepted - 1]
        return known + ["none"] * (accepted - 1 - len(known))

    def emit(self, i: int, toks: list[int], step: bool = True) -> list[int]:
        """Sequence i's new tokens, cut at EOS (kept) or max_new_tokens; nothing after that."""
        if step and not self.done[i]:
            self.stats.sequence_steps += 1
        out = []
        for t in toks:
            if self.done[i]:
                break
            out.append(t)
            self.emitted[i] += 1
            if t in self.eos or self.emitted[i] >= self.max_new_tokens:
                self.done[i] = True
        self.stats.generated_tokens += len(out)
        self.stats.step_tokens += len(out) if step else 0
        return out
