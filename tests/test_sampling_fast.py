"""The sampling fast path: draws among the warp's candidates (not the vocabulary) and rejection
sampling over Candidates with one-hot proposals left implicit (q None). Each is checked by a
chi-square test against the exact distribution it must follow."""

from __future__ import annotations

import pytest
import torch
from test_decoding import THRESHOLD, chi_square, reference_warp

from tidar.decode import sampling
from tidar.decode.accept import proposals, speculative_accept
from tidar.decode.sampling import Candidates, dense, prob_of, sample_candidates, warp, warp_candidates

N = 20000


def draw_counts(draw, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    counts = torch.zeros(shape)
    for _ in range(n):
        counts[draw()] += 1
    return counts


@pytest.mark.parametrize("flat_row", [False, True])
def test_draws_among_candidates_follow_the_warp(monkeypatch, flat_row):
    """Peaked rows keep their nucleus among the candidates; a flat row sends the batch to the full
    sort (every row widened to the vocabulary): draws follow `warp` either way."""
    monkeypatch.setattr(sampling, "CANDIDATES", 6)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 24, generator=g) * 3
    if flat_row:
        logits[1] = torch.randn(24, generator=g) * 0.1
    kept = warp_candidates(logits, 0.7, None, 0.9)
    assert kept.ids.shape[-1] == (24 if flat_row else 6)
    exact = reference_warp(logits, 0.7, None, 0.9)  # the full sort of every row
    torch.testing.assert_close(dense(kept, 24), exact, atol=1e-6, rtol=0)
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(3)
    counts = draw_counts(lambda: (rows, sample_candidates(kept, gen)), N, (3, 24))
    for r in range(3):
        stat, cells = chi_square(counts[r], exact[r])
        assert cells >= 2 and stat < THRESHOLD, (r, stat)


def test_prob_of_reads_the_dense_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 50, generator=g) * 4
    tokens = torch.randint(0, 50, (2, 3), generator=g)
    tokens[0, 0] = logits[0, 0].argmax()  # at least one kept token
    expect = warp(logits, 0.7, None, 0.8).gather(-1, tokens[..., None]).squeeze(-1)
    got = prob_of(warp_candidates(logits, 0.7, None, 0.8), tokens)
    torch.testing.assert_close(got, expect)
    assert got[0, 0] > 0 and (got == 0).any()


def exact_accept_dist(drafts: list[int], p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(a, bonus) of the rejection rule, written out: (b + 1, V), row a = acceptance length."""
    b, V = p.shape
    out = torch.zeros(b + 1, V, dtype=torch.float64)
    p, q, alive = p.double(), q.double(), 1.0
    for j in range(b - 1):  # d_{j+2} is verified against p[j]
        d = drafts[j + 1]
        keep = min(1.0, float(p[j, d] / q[j + 1, d])) if q[j + 1, d] > 0 else 1.0
        residual = (p[j] - q[j + 1]).clamp(min=0)
        out[j + 1] = alive * (1 - keep) * residual / residual.sum().clamp(min=1e-30)
        alive *= keep
    out[b] = alive * p[b - 1]
    return out


@pytest.mark.parametrize("implicit_one_hot", [True, False])
def test_speculative_accept_over_candidates_follows_the_rejection_rule(implicit_one_hot):
    """Copies (one-hot) and a sampled draft token, p as Candidates: (a, bonus) follows the rule
    exactly, whether the one-hot proposals are written out or left implicit (q None for copies)."""
    g = torch.Generator().manual_seed(5)
    V = 12
    logits = torch.randn(1, 4, V, generator=g)
    p = warp_candidates(logits, 0.9, None, 0.95)
    p_dense = warp(logits, 0.9, None, 0.95)[0]
    drafts = torch.tensor([[0, int(p_dense[0].argmax()), int(p_dense[1].argsort()[-2]), int(p_dense[2].argmax())]])
    one_hot = proposals(drafts, [None], V)
    assert one_hot is None
    q_row = torch.softmax(torch.randn(V, generator=g), -1)
    q = torch.nn.functional.one_hot(drafts, V).float()
    q[0, 0] = 0
    if not implicit_one_hot:  # d_3 drawn from q_row, as a diffusion draft token is
        q = proposals(drafts, [torch.stack([q[0, 1], q_row, q[0, 3]])], V)
    exact = exact_accept_dist(drafts[0].tolist(), p_dense, q[0])
    gen = torch.Generator().manual_seed(0)
    passed = None if implicit_one_hot else q
    counts = draw_counts(lambda: tuple(int(t) for t in speculative_accept(drafts, p, passed, gen)), N, (5, V))
    stat, cells = chi_square(counts, exact)
    assert cells >= 8 and stat < THRESHOLD, stat
    assert counts[1].sum() > 200 and counts[4].sum() > 200  # both a rejection and a full acceptance


def test_dense_and_candidate_p_give_the_same_accept_decisions():
    """Same generator state, same rule: p dense or as Candidates draws the same acceptance lengths."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 30, generator=g) * 3
    drafts = torch.randint(0, 30, (3, 4), generator=g)
    drafts[:, 1:] = logits[:, :-1].argmax(-1)
    for _ in range(20):
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        a_dense, _ = speculative_accept(drafts, warp(logits, 0.7, None, 0.9), None, torch.Generator().manual_seed(seed))
        a_cand, _ = speculative_accept(drafts, warp_candidates(logits, 0.7, None, 0.9), None,
                                       torch.Generator().manual_seed(seed))
        assert torch.equal(a_dense, a_cand)


def test_a_candidate_draw_is_a_candidate_with_positive_probability():
    c = Candidates(torch.tensor([[7, 3, 9]]), torch.tensor([[0.0, 1.0, 0.0]]))
    assert sample_candidates(c, torch.Generator().manual_seed(0)).tolist() == [3]
