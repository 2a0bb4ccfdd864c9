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
        if found:
            self.stopped = True
            self._held = ""
            return text[: min(found)]
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that starts some stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def flush(self) -> str:
        """The text held back; call when the stream ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
