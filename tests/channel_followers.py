"""Channel streams read by a test: a channel stream never ends, so each follower reads in a
thread of its own, up to the events it expects (then it closes, leaving the channel), and the
test waits for them with a deadline (:func:`taken`).

:func:`follow_client` reads through a Flask test client, :func:`follow_url` from a live server
with ``requests``; both return once the server has answered, that is once the stream is
subscribed: what is published after that reaches it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

from flask_sse_run.testing import ServerSentEvent, SSEParser, iter_events

__all__ = ["Followed", "follow", "follow_client", "follow_url", "taken"]

Followed = queue.Queue  # of ServerSentEvent


def follow(events: Iterator[ServerSentEvent], count: int, close: Callable[[], None]) -> Followed[Any]:
    """Read ``count`` events of ``events`` in a thread into a queue; then ``close``."""
    found: queue.Queue[ServerSentEvent] = queue.Queue()

    def read() -> None:
        try:
            for got, event in enumerate(events, 1):
                found.put(event)
                if got == count:
                    return
        finally:
            close()

    threading.Thread(target=read, daemon=True).start()
    return found


def follow_client(client: Any, path: str, count: int, **kwargs: Any) -> Followed[Any]:
    """A channel stream of a Flask test ``client`` (``kwargs`` go to ``client.get``)."""
    response = client.get(path, buffered=False, **kwargs)
    assert response.status_code == 200 and response.mimetype == "text/event-stream", response.get_data()
    return follow(iter_events(response), count, response.close)


def follow_url(url: str, count: int, **headers: str) -> Followed[Any]:
    """A channel stream of a live server, read with ``requests``."""
    response = requests.get(url, headers={"Accept": "text/event-stream", **headers}, stream=True, timeout=30)
    assert response.status_code == 200, response.text

    def events() -> Iterator[ServerSentEvent]:
        parser = SSEParser()
        for chunk in response.iter_content(chunk_size=None):
            yield from parser.feed(chunk)

    return follow(events(), count, response.close)


def taken(found: Followed[Any], count: int, timeout: float = 30) -> list[ServerSentEvent]:
    """The ``count`` events ``found`` gets within ``timeout`` seconds; AssertionError if fewer."""
    deadline = time.monotonic() + timeout
    events: list[ServerSentEvent] = []
    for _ in range(count):
        try:
            events.append(found.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"{len(events)} events of {count} came in {timeout} s: {events}") from None
    return events
