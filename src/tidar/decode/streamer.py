"""Text out of committed tokens: an incremental detokenizer that holds back a possible stop string."""

from __future__ import annotations

from collections.abc import Sequence


class TextStreamer:
    """Incremental detokenizer with stop strings: `push(ids)` returns the text now safe to show.

    Text that might be the start of a stop string is held back until it is disambiguated, so a
    stop string is never printed and nothing after it is emitted.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:  # noqa: ANN001
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.text()
        cut = len(text)
        for s in self.stop:
            k = text.find(s)
            if k != -1 and k < cut:
                cut = k
                self.stopped = True
        if not self.stopped and not final:
            cut = max(self.shown, cut - self._hold)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
                cut = min(cut, len(text) - 1)
        out = text[self.shown: cut] if cut > self.shown else ""
        self.shown = max(self.shown, cut)
        return out
