"""The acceptance rules: which drafted tokens a step keeps, and the token after them.

Greedy: a draft token stays while it equals the target's argmax. Sampling: rejection sampling
against the target distribution, so every committed token is distributed exactly as the target.
The target is AR's (beta = 1, lossless) or, with beta < 1, AR mixed with the diffusion logits each
token was drafted from (`mixed_target`, the paper's "trust AR / trust diffusion" ratio, §4.4.3).
"""

from __future__ import annotations

import torch

from tidar.decode.sampling import sample


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
