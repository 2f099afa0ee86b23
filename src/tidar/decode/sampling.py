"""Sampling math: the warp (temperature, top-k, top-p) and a draw, as small pure functions.

The top-p warp never sorts the vocabulary when it need not: the nucleus nearly always lies among a
few hundred most likely tokens, so it is looked for there first (`torch.topk`), with the whole
row's softmax as the normaliser, and only rows whose nucleus reaches past those candidates are
sorted in full. Either way the kept set and its probabilities are the ones the full sort gives.
Tokens with equal logits at the nucleus's edge are taken in token-id order, as a stable sort does
(the unstable sort used before kept an arbitrary few of them).

The decoder keeps a warped row as `Candidates` (token ids and their probabilities, every token
outside them at probability 0) and draws among those only: a draw over the vocabulary costs a
random number per token (torch.multinomial's exponential race), over the candidates a few hundred.
`warp` is the same distribution written out over the vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CANDIDATES = 256  # top-p looks for the nucleus among this many most likely tokens before sorting a row


class Candidates(NamedTuple):
    """A warped distribution per row: `ids` (..., K) tokens and `probs` (..., K) their probabilities
    (0 for a candidate outside the kept set); every token not among `ids` has probability 0."""

    ids: torch.Tensor
    probs: torch.Tensor


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus), as in transformers' warpers."""
    return dense(warp_candidates(logits, temperature, top_k, top_p), logits.shape[-1])


def warp_candidates(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> Candidates:
    """`warp`'s distribution as Candidates: with top_p, the nucleus among the CANDIDATES most likely
    tokens (the whole sorted vocabulary where any row's nucleus reaches past them); else every token."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = _mask_below_kth(logits, top_k)
    if top_p is None or top_p >= 1.0:
        ids = torch.arange(logits.shape[-1]).expand(logits.shape)
        return Candidates(ids, logits.softmax(-1))
    shape = logits.shape
    kept = _nucleus(logits.reshape(-1, shape[-1]), top_p)
    return Candidates(kept.ids.view(*shape[:-1], -1), kept.probs.view(*shape[:-1], -1))


def dense(c: Candidates, vocab: int) -> torch.Tensor:
    """Candidates written out as (..., vocab) probabilities."""
    return torch.zeros(*c.ids.shape[:-1], vocab).scatter_(-1, c.ids, c.probs)


def _mask_below_kth(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))  # tokens tied with the k-th stay


def _nucleus(logits: torch.Tensor, top_p: float) -> Candidates:
    """Top-p of (rows, V) logits: found among the CANDIDATES most likely tokens where the nucleus
    lies there, by a full sort of the other rows only (rare: a flat row; then every row's
    candidates are widened to the whole vocabulary, to share one tensor)."""
    vocab = logits.shape[-1]
    values, ids = _stable_descending(*torch.topk(logits, min(CANDIDATES, vocab), dim=-1))
    probs = logits.softmax(-1).gather(-1, ids)  # the normaliser needs the whole row, not the candidates
    kept, found = _nucleus_within(values, probs, top_p)
    out = Candidates(ids, kept)
    if vocab > CANDIDATES and not bool(found.all()):
        out = _widen(out, vocab)
        out.ids[~found], out.probs[~found] = _nucleus_by_sort(logits[~found], top_p)
    return out


def _widen(c: Candidates, vocab: int) -> Candidates:
    """(rows, K) candidates followed by every other token of the vocabulary at probability 0."""
    rows, k = c.ids.shape
    rest = torch.ones(rows, vocab, dtype=torch.bool).scatter_(-1, c.ids, False)
    rest_ids = rest.nonzero()[:, 1].view(rows, vocab - k)
    return Candidates(torch.cat([c.ids, rest_ids], -1), torch.cat([c.probs, c.probs.new_zeros(rows, vocab - k)], -1))


def _nucleus_by_sort(logits: torch.Tensor, top_p: float) -> Candidates:
    """Top-p by sorting whole rows: the reference the candidate search must equal."""
    values, ids = logits.sort(dim=-1, descending=True, stable=True)
    kept, _ = _nucleus_within(values, values.softmax(-1), top_p)
    return Candidates(ids, kept)


def _stable_descending(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """topk's candidates in the order a stable descending sort of the row gives them (equal logits by
    token id), so which of several tied tokens the nucleus keeps does not depend on topk's internals."""
    by_id = ids.argsort(-1)
    values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
    order = values.argsort(dim=-1, descending=True, stable=True)
    return values.gather(-1, order), ids.gather(-1, order)


def _nucleus_within(values: torch.Tensor, probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus among descending candidates: `values` their logits, `probs` their probabilities
    under the whole row. Returns the renormalised kept probabilities (0 for dropped candidates) and,
    per row, whether the nucleus provably lies within the candidates: its least likely token is
    strictly more likely than the last candidate, so the nucleus stops before it, and every token
    tied with that least likely one is a candidate (topk keeps all tokens above its last value)."""
    keep = probs.cumsum(-1) - probs < top_p  # the smallest set reaching top_p: what came before is short of it
    keep[..., 0] = True  # never empty: a top_p that rounds to 0 keeps the most likely token
    last = values.gather(-1, keep.sum(-1, keepdim=True) - 1)
    found = (last > values[..., -1:]).squeeze(-1)
    return values.masked_fill(~keep, float("-inf")).softmax(-1), found


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (..., V) probabilities."""
    shape = probs.shape[:-1]
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(shape)


def sample_candidates(c: Candidates, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, drawn among the candidates: the distribution `sample(dense(c))` draws from."""
    return c.ids.gather(-1, sample(c.probs, generator).unsqueeze(-1)).squeeze(-1)


def prob_of(c: Candidates, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's probability of its token: c (..., K), tokens (...) -> (...); 0 where not a candidate."""
    return torch.where(c.ids == tokens.unsqueeze(-1), c.probs, 0.0).sum(-1)
