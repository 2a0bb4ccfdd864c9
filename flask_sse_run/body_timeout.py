"""A deadline for reading a request body, so a client that trickles its body cannot hold a slot.

Under gunicorn's gevent worker (sockets monkey-patched) a read that blocks is one greenlet
waiting; :func:`with_deadline` bounds the whole body read, not each ``recv``, so a client that
sends one byte every few seconds is cut off too. On timeout the request is answered ``408`` and
gunicorn closes the connection (see :class:`BodyTimeout`).

The deadlines of one worker are checked by one hub timer (:mod:`flask_sse_run.deadlines`)
rather than by a ``gevent.Timeout`` per request. A read is cut off at most ``SWEEP_INTERVAL``
after its deadline.

Elsewhere (Flask's test client, sync or thread workers) Python cannot interrupt a blocked read,
so the stream is returned unchanged; there gunicorn's own ``timeout`` is the bound.
"""

from __future__ import annotations

import time

import gevent
from gevent import monkey

from .deadlines import SWEEP_INTERVAL, deadlines
from .errors import RequestError
from .payload import Readable

__all__ = ["SWEEP_INTERVAL", "BodyTimeout", "with_deadline"]


class BodyTimeout(Exception):
    """Raised inside the blocked read when the deadline passes.

    An ``Exception``, not gevent's ``Timeout`` (a ``BaseException``): gunicorn's body reader
    then marks the body as failed and closes the connection after the response, instead of
    waiting for the rest of the body before it reads the next keep-alive request.
    """


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
            sweeper = deadlines()
            greenlet = gevent.getcurrent()
            sweeper.add(greenlet, self._deadline, BodyTimeout)
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
