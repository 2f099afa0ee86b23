"""What a generation reports: forwards, tokens per forward, acceptance, accepted drafts by source."""

from __future__ import annotations

from dataclasses import dataclass, field

from tidar.decode.drafters import SOURCES


@dataclass
class GenerationStats:
    mode: str = "tidar"  # the mode that ran ("ar" for a batch past `max_draft_batch`)
    forwards: int = 0  # model forwards after prefill
    generated_tokens: int = 0
    step_tokens: int = 0  # tokens emitted by decode steps (the prefill emits each sequence's first)
    sequence_steps: int = 0  # decode forwards summed over the sequences still running
    query_tokens: int = 0  # new tokens (rows) fed to the decode forwards, summed
    plain_forwards: int = 0  # decode forwards without [MASK] rows (AR steps, lookup-span verification)
    plain_query_tokens: int = 0  # rows fed to those
    prefill_s: float = 0.0
    forward_s: float = 0.0  # time inside model forwards (after prefill)
    total_s: float = 0.0  # wall time after prefill
    acceptance_histogram: list[int] = field(default_factory=list)  # counts of a = 1..b per sequence-step
    # draft tokens accepted beyond d_1 (the committed bonus), by where the draft came from
    accepted_drafts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))

    @property
    def tokens_per_forward(self) -> float:
        return self.step_tokens / max(self.sequence_steps, 1)

    @property
    def query_tokens_per_forward(self) -> float:
        return self.query_tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def mean_acceptance(self) -> float:
        n = sum(self.acceptance_histogram)
        return sum((i + 1) * c for i, c in enumerate(self.acceptance_histogram)) / n if n else 0.0

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "forwards": self.forwards,
            "generated_tokens": self.generated_tokens,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "query_tokens": self.query_tokens,
            "plain_forwards": self.plain_forwards,
            "plain_query_tokens": self.plain_query_tokens,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "mean_acceptance": round(self.mean_acceptance, 4),
            "acceptance_histogram": list(self.acceptance_histogram),
            "accepted_drafts": dict(self.accepted_drafts),
            "prefill_s": round(self.prefill_s, 4),
            "forward_s": round(self.forward_s, 4),
            "overhead_fraction": round(1 - self.forward_s / self.total_s, 4) if self.total_s > 0 else 0.0,
        }


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # generated token ids per prompt (EOS included when hit)
    stats: GenerationStats
