"""The acceptance rules: which drafted tokens a step keeps, and the token after them.

Greedy: a draft token stays while it equals the AR argmax. Sampling: rejection sampling against the
AR distribution, so every committed token is distributed exactly as under AR sampling.
"""

from __future__ import annotations

import torch

from tidar.decode.sampling import sample


def greedy_accept(drafts: torch.Tensor, ar_next: torch.Tensor) -> torch.Tensor:
    """Acceptance lengths a in 1..b: d_1 is always committed; d_{i+1} is kept while it equals the
    AR argmax after d_i. drafts, ar_next: (B, b) -> (B,)."""
    match = drafts[:, 1:] == ar_next[:, :-1]
    return 1 + match.long().cumprod(-1).sum(-1)


def speculative_accept(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling (Leviathan et al.) of drafts d_2..d_b drawn from q against the AR p.

    drafts (B, b); p (B, b, V): AR distribution after each d_i; q (B, b, V): distribution each
    d_i was drawn from (q[:, 0] unused: d_1 is already committed). Returns (a, bonus): acceptance
    lengths in 1..b and the next token, drawn from norm(max(0, p - q)) at the first rejection or
    from p after d_b, so every committed token is distributed exactly as under AR sampling.
    """
    B, b = drafts.shape
    if b > 1:
        d = drafts[:, 1:].unsqueeze(-1)
        p_d = p[:, :-1].gather(-1, d).squeeze(-1)
        q_d = q[:, 1:].gather(-1, d).squeeze(-1)
        u = torch.rand(p_d.shape, generator=generator, dtype=p_d.dtype)
        ok = u * q_d < p_d  # u < p/q without dividing by a zero q
        a = 1 + ok.long().cumprod(-1).sum(-1)
    else:
        a = torch.ones(B, dtype=torch.long)
    rows = torch.arange(B)
    p_at = p[rows, a - 1]
    full = a == b
    q_next = q[rows, a.clamp(max=b - 1)]
    residual = (p_at - q_next).clamp(min=0)
    norm = residual.sum(-1, keepdim=True)
    # If p <= q everywhere the residual vanishes; that can only happen when the draft was accepted
    # with probability 1, so falling back to p is never actually used for a rejection.
    residual = torch.where(norm > 0, residual / norm.clamp(min=1e-30), p_at)
    dist = torch.where(full.unsqueeze(-1), p_at, residual)
    return a, sample(dist, generator)
