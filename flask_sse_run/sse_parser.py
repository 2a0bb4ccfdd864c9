"""Read an event stream: bytes in, events out, by the WHATWG rules, in bounded memory.

Pure code: no Flask, no HTTP client. :class:`EventStreamParser` is what
:mod:`flask_sse_run.relay` reads an upstream's body with; it follows the "interpreting an event
stream" rules of the WHATWG HTML standard (section 9.2.6):

* The stream is UTF-8; invalid bytes become U+FFFD; one byte order mark at the very start is
  dropped (even split across chunks).
* Lines end with CRLF, LF or CR, also when a CRLF is split across two chunks.
* A line starting with ``:`` is a comment. Otherwise the field name is what precedes the first
  ``:`` (the whole line if there is none) and one space after the colon is dropped.
* ``data`` appends a line to the event's data; ``event`` sets its type; ``id`` sets the last
  event ID unless the value holds a NUL; ``retry`` counts only when it is all ASCII digits;
  other fields are ignored.
* A blank line dispatches the event: with no ``data`` line, nothing is dispatched (the type is
  reset, the ID kept). At the end of the stream an event not yet ended by a blank line is
  discarded.

Where this parser has to choose, beyond the spec:

* **Bounded memory.** The bytes of one event (its data lines and the line being received) may
  not exceed ``max_event_bytes``; beyond, :meth:`~EventStreamParser.feed` raises
  :class:`ValueError`. The spec sets no limit; a relay needs one.
* **The event ID and ``retry``.** In a browser these belong to the connection. Here each
  dispatched :class:`ParsedEvent` carries the last event ID at its dispatch (as
  ``MessageEvent.lastEventId`` does) and the ``retry`` given since the previous dispatched
  event, if any, so a relay can pass both on with the next event.

Line breaks are found in the bytes, before decoding: CR and LF never occur inside a multi-byte
UTF-8 sequence, so decoding line by line gives the same text as decoding the whole stream.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_EVENT_BYTES", "EventStreamParser", "ParsedEvent"]

#: Default bound on the bytes of one event (1 MiB).
MAX_EVENT_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class ParsedEvent:
    """One dispatched event.

    ``event`` is ``"message"`` when the stream named no type; ``id`` is the last event ID at
    dispatch (``""`` if none was ever set); ``retry`` is the reconnection time in milliseconds
    set since the previous dispatched event, or ``None``.
    """

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class EventStreamParser:
    """Incremental parser: :meth:`feed` bytes as they arrive, get the events they complete."""

    __slots__ = (
        "_at_start",
        "_data",
        "_event",
        "_event_bytes",
        "_last_id",
        "_max",
        "_pending",
        "_retry",
        "_skip_lf",
        "comments",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be at least 1")
        self._max = max_event_bytes
        self._pending = b""  # the start of a line whose end has not arrived
        self._at_start = True  # a byte order mark may still come
        self._skip_lf = False  # the last chunk ended with CR: an LF first in the next ends that line
        self._data: list[str] = []
        self._event = ""
        self._event_bytes = 0  # bytes of the current event's data lines
        self._last_id = ""
        self._retry: int | None = None
        #: How many comment lines were seen (``: ping`` keep-alives, say).
        self.comments = 0

    @property
    def last_event_id(self) -> str:
        """The last event ID the stream set (``""`` if none)."""
        return self._last_id

    def feed(self, chunk: bytes) -> list[ParsedEvent]:
        """Parse ``chunk``; return the events it completed, in order.

        Raises :class:`ValueError` when one event's bytes exceed ``max_event_bytes``.
        """
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        data = self._pending + chunk if self._pending else chunk
        if self._at_start:
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._pending = data  # perhaps the start of a BOM: wait for the rest
                return []
            self._at_start = False
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        events: list[ParsedEvent] = []
        lines = data.splitlines(keepends=True)  # bytes split on CRLF, LF and CR only
        if lines and lines[-1][-1:] not in (b"\n", b"\r"):
            self._pending = lines.pop()
            if self._event_bytes + len(self._pending) > self._max:
                raise ValueError(f"an event larger than {self._max} bytes")
        else:
            self._pending = b""
            self._skip_lf = data[-1:] == b"\r"
        for line in lines:
            end = -2 if line[-2:] == b"\r\n" else -1
            event = self._line(line[:end])
            if event is not None:
                events.append(event)
        return events

    def end(self) -> bool:
        """Say the stream ended; return whether an unfinished event was discarded (the spec's rule)."""
        unfinished = bool(self._pending or self._data)
        self._pending, self._data, self._event, self._event_bytes = b"", [], "", 0
        return unfinished

    def _line(self, line: bytes) -> ParsedEvent | None:
        if not line:
            return self._dispatch()
        if line[:1] == b":":
            self.comments += 1
            return None
        text = line.decode("utf-8", "replace")
        name, colon, value = text.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._event_bytes += len(line)
            if self._event_bytes > self._max:
                raise ValueError(f"an event larger than {self._max} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> ParsedEvent | None:
        event_type, self._event = self._event, ""
        if not self._data:
            return None
        data, self._data, self._event_bytes = "\n".join(self._data), [], 0
        retry, self._retry = self._retry, None
        return ParsedEvent(data, event_type or "message", self._last_id, retry)
