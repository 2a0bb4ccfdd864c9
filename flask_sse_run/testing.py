"""Helpers for testing streaming endpoints: an SSE parser written to the spec, and helpers that
read a Flask test-client response into events as it streams.

:class:`SSEParser` follows the WHATWG HTML "server-sent events" parsing rules (line ends CR,
LF or CRLF, even split across chunks; one leading space stripped from values; ``id`` with NUL
ignored; ``retry`` only when all ASCII digits; an event without data is not dispatched). It is
written independently of :mod:`flask_sse_run.events` so each can check the other.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from werkzeug.datastructures import Headers

if TYPE_CHECKING:
    from flask.testing import FlaskClient
    from werkzeug.wrappers import Response

__all__ = ["SSEParser", "ServerSentEvent", "iter_events", "parse_events", "stream_events"]


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event, as a browser's ``EventSource`` would see it."""

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


@dataclass
class SSEParser:
    """Incremental parser: :meth:`feed` bytes as they arrive, get the events they complete."""

    comments: list[str] = field(default_factory=list)
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _buffer: str = ""
    _started: bool = False
    _skip_lf: bool = False
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _last_id: str = ""
    _retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Parse ``chunk``; return the events it completed."""
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if not text:  # an empty chunk (gzip decoders yield them) changes nothing
            return []
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]
        self._skip_lf = False
        self._buffer += text
        events: list[ServerSentEvent] = []
        while True:
            cr, lf = self._buffer.find("\r"), self._buffer.find("\n")
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            end = min(ends)
            line = self._buffer[:end]
            if self._buffer[end] == "\r":
                if end + 1 < len(self._buffer):
                    skip = 2 if self._buffer[end + 1] == "\n" else 1
                else:  # a CR at the end of a chunk: the LF of its CRLF may come next
                    skip, self._skip_lf = 1, True
            else:
                skip = 1
            self._buffer = self._buffer[end + skip :]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            data="\n".join(self._data), event=self._event or "message", id=self._last_id, retry=self._retry
        )
        self._data, self._event = [], ""
        return event


def parse_events(chunks: bytes | Iterable[bytes]) -> list[ServerSentEvent]:
    """Parse a whole stream (bytes, or an iterable of chunks) into its events."""
    parser = SSEParser()
    if isinstance(chunks, bytes):
        chunks = [chunks]
    return [event for chunk in chunks for event in parser.feed(chunk)]


def iter_events(response: Response) -> Iterator[ServerSentEvent]:
    """Yield the events of a streamed response as its chunks arrive; close it at the end.

    Use with a test-client response made with ``buffered=False`` to see each event the moment
    the function yields it (a buffered response has already run the function to its end).
    Stopping early (``break``, or closing the iterator) closes the response, which closes the
    function's generator.
    """
    parser = SSEParser()
    try:
        for chunk in response.iter_encoded():
            yield from parser.feed(chunk)
    finally:
        response.close()


def stream_events(
    client: FlaskClient, path: str, *, json: Any = None, **kwargs: Any
) -> list[ServerSentEvent]:
    """POST ``json`` to ``path`` with the test ``client`` and return every event of the stream.

    Other keyword arguments (``headers=``, ``data=``...) go to ``client.post``. Raises
    :class:`AssertionError`, showing the status and body, if the answer is not a ``200``
    ``text/event-stream`` (a 4xx JSON error, say).
    """
    headers = Headers(kwargs.pop("headers", None))
    headers.setdefault("Accept", "text/event-stream")
    response = client.post(path, json=json, headers=headers, buffered=False, **kwargs)
    if response.status_code != 200 or response.mimetype != "text/event-stream":
        body = response.get_data(as_text=True)
        response.close()
        raise AssertionError(
            f"POST {path}: expected a 200 text/event-stream, got {response.status} "
            f"{response.content_type}: {body[:500]}"
        )
    return list(iter_events(response))
