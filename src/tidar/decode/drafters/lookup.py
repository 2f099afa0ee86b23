"""Prompt lookup: when the context's last n-gram occurred earlier, draft what followed it there
(at the occurrence whose preceding tokens match the context furthest back: the same n-gram in the
same surroundings). Copies are free to propose; only verifying them costs rows."""

from __future__ import annotations

from collections.abc import Sequence

from tidar.decode.drafters import Draft, DraftContext, Drafter

CANDIDATES = 32  # compare the latest this many occurrences of the n-gram
MATCH_CAP = 64  # ...by how far back their preceding tokens match the context, up to this many


class LookupDrafter(Drafter):
    source = "lookup"

    def __init__(self, ngram: int, max_tokens: int) -> None:
        self.n = ngram
        self.max_tokens = max_tokens
        self.index: dict[int, dict[tuple[int, ...], list[int]]] = {}  # per sequence key

    def add(self, keys: Sequence[int], histories: Sequence[list[int]]) -> None:
        for key, h in zip(keys, histories, strict=True):
            self.index[key] = {}
            self.extend(key, h, 0)

    def remove(self, keys: Sequence[int]) -> None:
        for key in keys:
            self.index.pop(key, None)

    def extend(self, key: int, history: list[int], start: int) -> None:
        """Record, for every n-gram ending before position j >= start, that token j followed it."""
        n, index = self.n, self.index[key]
        for j in range(max(start, n), len(history)):
            index.setdefault(tuple(history[j - n: j]), []).append(j)

    def propose(self, key: int, ctx: DraftContext) -> Draft | None:
        hist, n, limit = ctx.history, self.n, self.max_tokens
        where = self.index[key].get(tuple(hist[-n:])) if len(hist) >= n else None
        if not where:
            return None
        end = len(hist)
        # prefer occurrences with a full draft after them: the very latest occurrence inside a
        # repeating run has a one-token continuation
        cands = where[-CANDIDATES:]
        cands = [j for j in cands if end - j >= limit] or cands
        best, best_m = cands[-1], -1
        for j in reversed(cands):  # latest first: it wins ties
            m = n
            while m < MATCH_CAP and j - 1 - m >= 0 and hist[j - 1 - m] == hist[end - 1 - m]:
                m += 1
            if m > best_m:
                best, best_m = j, m
        return Draft(hist[best: best + limit], self.source)
