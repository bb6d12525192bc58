"""Stop strings, matched in generated text across token boundaries.

OpenAI semantics: the output ends right before the first occurrence of any stop
string, which itself is not returned. While streaming, text that could still grow
into a stop string is held back, so a client never receives text it must unsee.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop_strings: list[str]):
        self._stops = [s for s in stop_strings if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The output so far, cut at the stop string once one matched."""
        return self._text

    def feed(self, delta: str) -> str:
        """Add generated text; return the part that is now safe to send."""
        if self.stopped or not delta:
            return ""
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        cut = self._first_stop(search_from)
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            return self._take(len(self._text))
        return self._take(len(self._text) - self._partial_stop_suffix())

    def flush(self) -> str:
        """The sequence ended without a stop string: release what was held back."""
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _first_stop(self, search_from: int) -> int | None:
        hits = [i for s in self._stops if (i := self._text.find(s, search_from)) >= 0]
        return min(hits, default=None)

    def _partial_stop_suffix(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for length in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0
