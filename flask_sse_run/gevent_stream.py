"""The streaming body under gevent: the generator runs in a greenlet of its own.

The user's generator (the producer) runs in its own greenlet and appends encoded events to a
bounded buffer; the response body (the consumer, run by the server's request greenlet) writes
whatever is in the buffer in one write, waits for more with a timeout, and writes a ``: ping``
comment when the timeout passes. So:

* keep-alive needs no cooperation from the generator, even while it blocks;
* events that pile up while the socket is busy go out together (write coalescing), and an
  event is never held back when the generator is slow;
* a generator that never blocks still gives the hub a turn every ``FAIR_SLICE`` seconds, so it
  cannot starve the worker's other streams or gunicorn's heartbeat;
* when the client disconnects (seen at once by a read watcher on the socket) or the worker
  shuts down, the producer greenlet is killed: its generator's ``finally`` blocks run and its
  :class:`~flask_sse_run.CancelToken` is cancelled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

import gevent
from gevent.event import Event as GEvent

from . import shutdown
from .cancellation import CancelToken, bind_token
from .disconnect import watch_for_disconnect
from .events import KEEPALIVE, encode
from .streaming import StreamOptions, close_iterator, closing_events

__all__ = ["BUFFER_EVENTS", "FAIR_SLICE", "GeventStream"]

#: Longest a never-blocking generator runs before the hub gets a turn (seconds).
FAIR_SLICE = 0.005
#: Most encoded events waiting for the socket before the generator is paused.
BUFFER_EVENTS = 256


class GeventStream:
    """A WSGI body iterable; see the module docstring."""

    def __init__(
        self,
        source: Iterator[Any],
        options: StreamOptions,
        *,
        token: CancelToken,
        in_context: Callable[[Callable[[], None]], None],
        sock: Any = None,
    ) -> None:
        self._source = source
        self._options = options
        self._token = token
        self._in_context = in_context
        self._sock = sock
        self._buffer: deque[bytes] = deque()
        self._ready = GEvent()  # set by the producer when the buffer gets an event or it ends
        self._space = GEvent()  # set by the consumer when a full buffer has been drained
        self._producer: Any = None
        self._done = False
        self._error: BaseException | None = None
        self._ended_by: str | None = None  # "disconnect" or "shutdown"

    def __iter__(self) -> Iterator[bytes]:
        return self._consume()

    # -- the producer greenlet ---------------------------------------------------------------

    def _produce(self) -> None:
        try:
            self._in_context(self._iterate)
        finally:
            self._done = True
            self._ready.set()

    def _iterate(self) -> None:
        source, buffer, ready = self._source, self._buffer, self._ready
        loop = gevent.get_hub().loop
        try:
            with bind_token(self._token):
                turn, started = loop.iteration, perf_counter()
                for item in source:
                    buffer.append(encode(item))
                    ready.set()
                    if len(buffer) >= BUFFER_EVENTS:
                        self._space.clear()
                        self._space.wait()
                    elif loop.iteration != turn:  # the generator blocked: the hub has run
                        turn, started = loop.iteration, perf_counter()
                        continue
                    elif perf_counter() - started < FAIR_SLICE:
                        continue
                    else:
                        gevent.sleep(0)
                    turn, started = loop.iteration, perf_counter()
        except Exception as exc:
            self._error = exc
            self._options.logger.error("stream %s failed", self._options.request_id, exc_info=exc)
        finally:
            close_iterator(source)

    # -- the consumer: the body the server writes ----------------------------------------------

    def _consume(self) -> Iterator[bytes]:
        options = self._options
        gzip = options.new_gzip()
        write: Callable[[bytes], bytes] = gzip.write if gzip is not None else bytes
        timeout = options.keepalive or None
        buffer, ready = self._buffer, self._ready
        self._producer = gevent.spawn_raw(self._produce)
        watcher = watch_for_disconnect(self._sock, self._disconnected) if self._sock is not None else None
        shutdown.register(self)
        try:
            while True:
                if buffer:
                    chunk = b"".join(buffer)
                    buffer.clear()
                    self._space.set()
                    yield write(chunk)
                    continue
                if self._done or self._ended_by is not None:
                    break
                ready.clear()
                if not ready.wait(timeout):
                    yield write(KEEPALIVE)
            if self._ended_by == "disconnect":
                return
            tail = closing_events(options, self._error, shutdown=self._ended_by == "shutdown")
            if tail:
                yield write(tail)
            if gzip is not None:
                yield gzip.finish()
        finally:
            if watcher is not None:
                watcher.close()
            shutdown.unregister(self)
            self._stop_producer("closed")

    def _stop_producer(self, reason: str) -> None:
        self._token.cancel(reason)
        if not self._done and self._producer is not None:
            # Raises GreenletExit where the generator waits: its finally blocks run.
            gevent.kill(self._producer)

    def _disconnected(self) -> None:
        self._end("disconnect")

    def shutdown(self) -> None:
        """End the stream with the shutdown event (worker going down)."""
        self._end("shutdown")

    def _end(self, why: str) -> None:
        if self._ended_by is None and not self._done:
            self._ended_by = why
            self._stop_producer(why)
            self._ready.set()
