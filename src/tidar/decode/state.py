"""The explicit state of one batch being decoded: cache, committed lengths, current drafts, and
what each sequence has emitted. Rows can join (`concat`) and leave (`select`) between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tidar.decode.drafters.diffusion import DraftGate
from tidar.decode.stats import GenerationStats
from tidar.model.transformer import KVCache


@dataclass
class BatchState:
    cache: KVCache
    n_committed: torch.Tensor  # (B,) tokens of each sequence in the cache = the position of its next token
    histories: list[list[int]]  # prompt + emitted tokens, per sequence (copy drafts read them)
    eos: set[int]
    max_new_tokens: list[int]  # per sequence
    stats: GenerationStats  # the whole batch's
    keys: list[int]  # each sequence's key with the draft sources (stable while rows come and go)
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
    row_stats: list[GenerationStats] = field(default_factory=list)  # each sequence's own share

    def __post_init__(self) -> None:
        B = len(self.histories)
        self.done = [False] * B
        self.emitted = [0] * B
        self.sources = ["none"] * B
        self.lengths = [1] * B
        self.token_sources = [[] for _ in range(B)]
        hist = [0] * len(self.stats.acceptance_histogram)
        self.row_stats = [GenerationStats(mode=self.stats.mode, acceptance_histogram=list(hist)) for _ in range(B)]

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

    def both(self, i: int) -> tuple[GenerationStats, GenerationStats]:
        """The batch's statistics and sequence i's, which count the same events."""
        return self.stats, self.row_stats[i]

    def emit(self, i: int, toks: list[int], step: bool = True) -> list[int]:
        """Sequence i's new tokens, cut at EOS (kept) or max_new_tokens; nothing after that."""
        if step and not self.done[i]:
            for s in self.both(i):
                s.sequence_steps += 1
        out = []
        for t in toks:
            if self.done[i]:
                break
            out.append(t)
            self.emitted[i] += 1
            if t in self.eos or self.emitted[i] >= self.max_new_tokens[i]:
                self.done[i] = True
        for s in self.both(i):
            s.generated_tokens += len(out)
            s.step_tokens += len(out) if step else 0
        return out

    # -- continuous batching ---------------------------------------------------------------------
    PER_ROW = ("histories", "max_new_tokens", "keys", "sources", "lengths", "token_sources", "done", "emitted", "row_stats")

    def select(self, rows: list[int]) -> BatchState:
        """Only these rows, in this order (the others left the batch); the batch statistics stay."""
        idx = torch.tensor(rows, dtype=torch.long)
        out = BatchState(self.cache.select(rows), self.n_committed[idx], [], self.eos, [], self.stats, [], self.gate)
        for name in self.PER_ROW:
            setattr(out, name, [getattr(self, name)[i] for i in rows])
        out.drafts = self.drafts[idx] if self.drafts is not None else None
        out.q = self.q[idx] if self.q is not None else None
        out.draft_logits = tuple(t[idx] for t in self.draft_logits) if self.draft_logits is not None else None
        if self.gate:
            self.gate.select(rows)
        return out

    def concat(self, other: BatchState) -> BatchState:
        """This batch's rows, then `other`'s (just prefilled); the batch statistics stay this one's."""
        out = BatchState(self.cache.concat(other.cache), torch.cat([self.n_committed, other.n_committed]), [], self.eos,
                         [], self.stats, [], self.gate)
        for name in self.PER_ROW:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        width = max(self.drafts.shape[1], other.drafts.shape[1])
        out.drafts = torch.cat([_pad(self.drafts, width), _pad(other.drafts, width)])
        if self.q is not None or other.q is not None:
            vocab = (self.q if self.q is not None else other.q).shape[-1]
            out.q = torch.cat([_padded_q(self, width, vocab), _padded_q(other, width, vocab)])
        if self.draft_logits is not None or other.draft_logits is not None:
            out.draft_logits = _concat_logits(self.draft_logits, other.draft_logits, len(self.done), len(other.done), width)
        if self.gate:
            self.gate.extend(len(other.done))
        # `other` has only been prefilled: its first tokens and the prefill's time
        self.stats.prefill_s += other.stats.prefill_s
        self.stats.generated_tokens += other.stats.generated_tokens
        return out


def _pad(drafts: torch.Tensor, width: int) -> torch.Tensor:
    # padding drafts with token 0, as `step.pack_drafts` does: a valid proposal, verified like any other
    return F.pad(drafts, (0, width - drafts.shape[1]))


def _padded_q(st: BatchState, width: int, vocab: int) -> torch.Tensor:
    """Proposal distributions (B, width, V): the padding (and a batch that drafted greedily) one-hot."""
    q = F.one_hot(_pad(st.drafts, width), vocab).float()
    if st.q is not None:
        q[:, : st.q.shape[1]] = st.q
    q[:, 0] = 0
    return q


def _concat_logits(a: tuple[torch.Tensor, torch.Tensor] | None, b: tuple[torch.Tensor, torch.Tensor] | None,
                   n_a: int, n_b: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = (a or b)[0].shape[-1]
    parts = []
    for x, n in ((a, n_a), (b, n_b)):
        logits, mixable = torch.zeros(n, width, vocab), torch.zeros(n, width, dtype=torch.bool)
        if x is not None:
            logits[:, : x[0].shape[1]], mixable[:, : x[1].shape[1]] = x
        parts.append((logits, mixable))
    return torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]])
