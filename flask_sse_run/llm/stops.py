"""End a text stream before the first stop string, even one split across pieces.

Pure Python. Text that could be the start of a stop string is held back until the next piece
says whether it is one: with ``stop=["\\nUser:"]``, a piece ending in ``"\\nUs"`` is handed out
without that tail, and the tail follows (or is dropped) when more text arrives.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStrings"]


class StopStrings:
    """Feed text pieces; get what may be handed out, and whether a stop string was reached."""

    def __init__(self, stop: Sequence[str]) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text that is certainly before any stop string.

        Once a stop string is found, :attr:`stopped` is true, the text before it is returned and
        everything after it (later pieces included) is dropped.
        """
        if self.stopped:
            return ""
        if not self._stop:
            return piece
        text = self._held + piece
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        keep = self._partial_tail(text)
        # A stop string that may still complete (its start is in the tail) and begins before
        # the earliest complete one would end the text earlier: wait for the next piece.
        partial = len(text) - keep if keep else len(text)
        if found and min(found) <= partial:
            self.stopped = True
            self._held = ""
            return text[: min(found)]
        self._held = text[partial:]
        return text[:partial]

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def flush(self) -> str:
        """The text held back, up to a stop string it holds; call when the stream ends."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        found = [i for i in (held.find(s) for s in self._stop) if i >= 0]
        if found:
            self.stopped = True
            return held[: min(found)]
        return held
