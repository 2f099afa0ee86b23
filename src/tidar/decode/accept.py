"""The acceptance rules: which drafted tokens a step keeps, and the token after them.

Greedy: a draft token stays while it equals the target's argmax. Sampling: rejection sampling
against the target distribution, so every committed token is distributed exactly as the target.
The target is AR's (beta = 1, lossless) or, with beta < 1, AR mixed with the diffusion logits each
token was drafted from (`mixed_target`, the paper's "trust AR / trust diffusion" ratio, §4.4.3).
"""

from __future__ import annotations

import torch

from tidar.decode.sampling import Candidates, prob_of, sample_candidates


def mixed_target(ar_logits: torch.Tensor, draft_logits: torch.Tensor, mixable: torch.Tensor, beta: float
                 ) -> torch.Tensor:
    """The logits each draft token is verified against: row j (the position after d_{j+1}) is
    beta * AR + (1 - beta) * the diffusion logits d_{j+2} was drafted from, where it was drafted
    by diffusion (`mixable`); AR alone elsewhere (copied tokens, padding, the row after the draft).

    ar_logits (B, W, V): AR logits after each d_i; draft_logits (B, W, V): drafting logits of d_i
    (column 0, the committed bonus token, is never read); mixable (B, W) bool.
    """
    if beta >= 1.0:
        return ar_logits
    ar_next = ar_logits[:, :-1]
    mix = beta * ar_next + (1.0 - beta) * draft_logits[:, 1:].to(ar_next.dtype)
    return torch.cat([torch.where(mixable[:, 1:, None], mix, ar_next), ar_logits[:, -1:]], dim=1)


def greedy_accept(drafts: torch.Tensor, ar_next: torch.Tensor) -> torch.Tensor:
    """Acceptance lengths a in 1..b: d_1 is always committed; d_{i+1} is kept while it equals the
    AR argmax after d_i. drafts, ar_next: (B, b) -> (B,)."""
    match = drafts[:, 1:] == ar_next[:, :-1]
    return 1 + match.long().cumprod(-1).sum(-1)


def speculative_accept(drafts: torch.Tensor, p: torch.Tensor | Candidates, q: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling (Leviathan et al.) of drafts d_2..d_b drawn from q against the AR p.

    drafts (B, b); p: AR distribution after each d_i, (B, b, V) probabilities or Candidates
    (B, b, K); q (B, b, V): distribution each d_i was drawn from (q[:, 0] unused: d_1 is already
    committed), None when every draft token is one-hot (copies, padding). Returns (a, bonus):
    acceptance lengths in 1..b and the next token, drawn from norm(max(0, p - q)) at the first
    rejection or from p after d_b, so every committed token is distributed exactly as under AR
    sampling. The residual is built over p's candidates only: max(0, p - q) is 0 wherever p is.
    """
    if not isinstance(p, Candidates):
        p = Candidates(torch.arange(p.shape[-1]).expand(p.shape), p)
    B, b = drafts.shape
    a = _accepted(drafts, p, q, generator) if b > 1 else torch.ones(B, dtype=torch.long)
    rows = torch.arange(B)
    p_at = Candidates(p.ids[rows, a - 1], p.probs[rows, a - 1])  # (B, K): p after the last accepted token
    nxt = a.clamp(max=b - 1)  # the rejected draft's column (unused where every draft was accepted)
    if q is None:
        q_next = (p_at.ids == drafts[rows, nxt].unsqueeze(-1)).to(p_at.probs.dtype)
    else:
        q_next = q[rows, nxt].gather(-1, p_at.ids)
    residual = (p_at.probs - q_next).clamp(min=0)
    norm = residual.sum(-1, keepdim=True)
    # If p <= q everywhere the residual vanishes; that can only happen when the draft was accepted
    # with probability 1, so falling back to p is never actually used for a rejection.
    residual = torch.where(norm > 0, residual / norm.clamp(min=1e-30), p_at.probs)
    dist = torch.where((a == b).unsqueeze(-1), p_at.probs, residual)
    return a, sample_candidates(Candidates(p_at.ids, dist), generator)


def _accepted(drafts: torch.Tensor, p: Candidates, q: torch.Tensor | None, generator: torch.Generator | None
              ) -> torch.Tensor:
    """Acceptance lengths: d_{i+1} stays with probability min(1, p(d_{i+1}) / q(d_{i+1})) while every
    draft before it stayed."""
    d = drafts[:, 1:]
    p_d = prob_of(Candidates(p.ids[:, :-1], p.probs[:, :-1]), d)
    q_d = q[:, 1:].gather(-1, d.unsqueeze(-1)).squeeze(-1) if q is not None else torch.ones_like(p_d)
    u = torch.rand(p_d.shape, generator=generator, dtype=p_d.dtype)
    ok = u * q_d < p_d  # u < p/q without dividing by a zero q
    return 1 + ok.long().cumprod(-1).sum(-1)


def proposals(tokens: torch.Tensor, rows: list[torch.Tensor | None], vocab: int) -> torch.Tensor | None:
    """The proposal distributions (B, W, V) of packed drafts: `rows[i]` (n_i, V) what sequence i's
    d_2..d_{n_i+1} were drawn from, None for a one-hot draft; one-hot elsewhere (padding), column 0
    zero (never read). None when every draft is one-hot: `speculative_accept` reads that directly."""
    if all(r is None for r in rows):
        return None
    q = torch.zeros(*tokens.shape, vocab).scatter_(-1, tokens.unsqueeze(-1), 1.0)
    q[:, 0] = 0
    for i, r in enumerate(rows):
        if r is not None:
            q[i, 1: 1 + len(r)] = r
    return q
