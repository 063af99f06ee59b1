"""Stop strings matched on decoded text, across token boundaries, never emitted."""
from __future__ import annotations


class StopStringFilter:
    """Feeds on streamed text pieces; releases text that cannot be the start of a stop string, holds back the rest.

    `push(piece)` returns (text safe to emit, whether a stop string was completed). On a match, the text before the
    stop string is released and everything from the stop string on is dropped.
    """

    def __init__(self, stop_strings: list[str] | tuple[str, ...] = ()):
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Feed one text piece -> (text safe to emit now, whether a stop string was completed)."""
        if not self.stop_strings:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = self._held_suffix_length()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        """Release what was held back (the stream ended without completing a stop string)."""
        out, self.pending = self.pending, ""
        return out

    def _held_suffix_length(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best
