"""A deadline for reading a request body, so a client that trickles its body cannot hold a slot.

Under gunicorn's gevent worker (sockets monkey-patched) a read that blocks is one greenlet
waiting; :func:`with_deadline` bounds the whole body read, not each ``recv``, so a client that
sends one byte every few seconds is cut off too. On timeout the request is answered ``408`` and
gunicorn closes the connection (see :class:`BodyTimeout`).

The deadlines of one worker are checked by one hub timer every ``SWEEP_INTERVAL`` seconds
rather than by a ``gevent.Timeout`` per request: almost every body is already in the server's
buffer when it is read, and a timer armed and cancelled for each of them was a measurable part
of a short request's cost. A read is cut off at most ``SWEEP_INTERVAL`` after its deadline.

Elsewhere (Flask's test client, sync or thread workers) Python cannot interrupt a blocked read,
so the stream is returned unchanged; there gunicorn's own ``timeout`` is the bound.
"""

from __future__ import annotations

import time
from typing import Any

import gevent
from gevent import monkey

from .errors import RequestError
from .payload import Readable

__all__ = ["SWEEP_INTERVAL", "BodyTimeout", "with_deadline"]

#: How often the blocked body reads of a worker are checked against their deadlines (seconds).
SWEEP_INTERVAL = 0.1


class BodyTimeout(Exception):
    """Raised inside the blocked read when the deadline passes.

    An ``Exception``, not gevent's ``Timeout`` (a ``BaseException``): gunicorn's body reader
    then marks the body as failed and closes the connection after the response, instead of
    waiting for the rest of the body before it reads the next keep-alive request.
    """


class _Sweeper:
    """The body reads in progress on one hub, and the timer that ends the late ones."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._reads: dict[Any, float] = {}  # greenlet -> deadline (time.monotonic)
        self._timer: Any = None

    def add(self, greenlet: Any, deadline: float) -> None:
        self._reads[greenlet] = deadline
        if self._timer is None:
            # Runs while reads are registered and stops at the first sweep that finds none, so
            # an idle worker is not woken; ref=False: it never keeps the loop alive by itself.
            self._timer = self._loop.timer(SWEEP_INTERVAL, SWEEP_INTERVAL, ref=False)
            self._timer.start(self._sweep)

    def discard(self, greenlet: Any) -> None:
        self._reads.pop(greenlet, None)

    def _sweep(self) -> None:
        if not self._reads:
            self._timer.close()
            self._timer = None
            return
        now = time.monotonic()
        late = [greenlet for greenlet, deadline in self._reads.items() if deadline <= now]
        for greenlet in late:
            # Still registered: the hub runs only while every greenlet waits, so it is blocked
            # inside its read, which is where the exception lands. (One thrown earlier in this
            # loop may have run on and ended another's read meanwhile: that one is skipped.)
            if self._reads.pop(greenlet, None) is not None and not greenlet.dead:
                greenlet.throw(BodyTimeout)


def _sweeper() -> _Sweeper:
    hub = gevent.get_hub()  # one per OS thread, each with its own loop
    sweeper: _Sweeper | None = getattr(hub, "_sse_run_body_sweeper", None)
    if sweeper is None:
        sweeper = _Sweeper(hub.loop)
        hub._sse_run_body_sweeper = sweeper
    return sweeper


class _DeadlineStream:
    __slots__ = ("_deadline", "_seconds", "_stream")

    def __init__(self, stream: Readable, seconds: float) -> None:
        self._stream = stream
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds

    def read(self, size: int = -1, /) -> bytes:
        try:
            if time.monotonic() >= self._deadline:
                raise BodyTimeout
            sweeper = _sweeper()
            greenlet = gevent.getcurrent()
            sweeper.add(greenlet, self._deadline)
            try:
                return self._stream.read(size)
            finally:
                sweeper.discard(greenlet)
        except BodyTimeout:
            raise RequestError(
                408, f"the request body did not arrive within {self._seconds:g} seconds"
            ) from None


def with_deadline(stream: Readable, seconds: float) -> Readable:
    """``stream``, whose reads raise :class:`RequestError` (408) ``seconds`` from now.

    Returns ``stream`` itself when ``seconds`` is 0 (off) or sockets are not gevent's.
    """
    if not seconds or not monkey.is_module_patched("socket"):
        return stream
    return _DeadlineStream(stream, seconds)
