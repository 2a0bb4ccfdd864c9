"""SSE clients for the live tests that record when each event arrives.

:func:`run_streams`: many clients in one thread (raw sockets + epoll), for the live tests and
the benchmarks that need hundreds of concurrent streams (one thread with non-blocking sockets
scales where a thread per client would not). :func:`timed_events`: one ``requests`` stream.
"""

from __future__ import annotations

import itertools
import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask_sse_run.testing import ServerSentEvent, SSEParser

if TYPE_CHECKING:
    import requests

__all__ = ["StreamResult", "run_streams", "timed_events"]


@dataclass
class StreamResult:
    """What one client saw."""

    started: float = 0.0
    status: int | None = None
    event_times: list[float] = field(default_factory=list)
    complete: bool = False  # the final chunk arrived
    error: str | None = None
    _buffer: bytes = b""
    _carry: bytes = b""
    _headers_done: bool = False

    def max_gap(self) -> float:
        """Largest time between consecutive events (the first counted from the request)."""
        times = [self.started, *self.event_times]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def _request(path: str, body: dict[str, Any], host: str) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


def _feed(result: StreamResult, data: bytes, now: float) -> None:
    if not result._headers_done:
        result._buffer += data
        head, sep, rest = result._buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        result._headers_done = True
        result.status = int(head.split(b" ", 2)[1])
        result._buffer = b""
        data = rest
    # Events end with a blank line ("\n\n"); chunk framing only ever adds "\r\n".
    text = result._carry + data
    count = text.count(b"\n\n") - result._carry.count(b"\n\n")
    result.event_times.extend([now] * count)
    result._carry = text[-1:]
    if text.endswith(b"0\r\n\r\n"):
        result.complete = True


def run_streams(
    port: int,
    path: str,
    body: dict[str, Any],
    clients: int,
    *,
    timeout: float,
    host: str = "127.0.0.1",
    drop_after_events: int | None = None,
    connect_batch: int = 500,
) -> list[StreamResult]:
    """Open ``clients`` streams at once and read them all until they end or ``timeout`` passes.

    With ``drop_after_events`` each client closes its socket after that many events.
    """
    request = _request(path, body, host)
    selector = selectors.DefaultSelector()
    results = [StreamResult() for _ in range(clients)]
    pending = list(range(clients))
    deadline = time.monotonic() + timeout
    open_count = 0
    try:
        while (pending or open_count) and time.monotonic() < deadline:
            for index in pending[:connect_batch]:
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((host, port))
                results[index].started = time.monotonic()
                selector.register(sock, selectors.EVENT_WRITE, (index, request))
                open_count += 1
            pending = pending[connect_batch:]
            for key, mask in selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                index, unsent = key.data
                result = results[index]
                try:
                    if mask & selectors.EVENT_WRITE:
                        sent = sock.send(unsent)
                        if sent < len(unsent):
                            selector.modify(sock, selectors.EVENT_WRITE, (index, unsent[sent:]))
                        else:
                            selector.modify(sock, selectors.EVENT_READ, (index, b""))
                        continue
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    result.error = repr(exc)
                    data = b""
                if data:
                    _feed(result, data, time.monotonic())
                    dropped = drop_after_events is not None and len(result.event_times) >= drop_after_events
                    if not (dropped or result.complete):
                        continue
                selector.unregister(sock)
                sock.close()
                open_count -= 1
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
    return results


def timed_events(
    response: requests.Response, limit: int | None = None
) -> list[tuple[float, ServerSentEvent]]:
    """The events of a ``requests`` stream (``stream=True``), each with the time it arrived;
    stops after ``limit`` events."""
    parser, out = SSEParser(), []
    for chunk in response.raw.stream(65536, decode_content=True):
        now = time.monotonic()
        out.extend((now, event) for event in parser.feed(chunk))
        if limit is not None and len(out) >= limit:
            break
    return out
