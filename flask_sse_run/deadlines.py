"""Deadlines on blocking operations of greenlets, all checked by one hub timer per worker.

A request body that trickles in (``SSE_RUN_BODY_TIMEOUT``) and a write to a client that stopped
reading (``SSE_RUN_SEND_TIMEOUT``) are both a greenlet blocked for too long in socket I/O. Rather
than a ``gevent.Timeout`` armed and cancelled per operation (almost every body is already in
the server's buffer when it is read, and almost every write completes at once: a timer per
operation was a measurable part of a short request's cost), an operation registers its greenlet
and deadline here, and one timer ends the late ones every ``SWEEP_INTERVAL`` seconds by throwing
an exception into the greenlet where it waits. An operation is ended at most ``SWEEP_INTERVAL``
after its deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent

__all__ = ["SWEEP_INTERVAL", "Deadlines", "deadlines"]

#: How often the registered operations of a worker are checked against their deadlines (seconds).
SWEEP_INTERVAL = 0.1


class Deadlines:
    """The operations in progress on one hub, and the timer that ends the late ones."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        # greenlet -> (deadline on time.monotonic, what to throw into it)
        self._waiting: dict[Any, tuple[float, Callable[[], BaseException]]] = {}
        self._timer: Any = None

    def add(self, greenlet: Any, deadline: float, error: Callable[[], BaseException]) -> None:
        """Throw ``error()`` into ``greenlet`` if it is still registered at ``deadline``.

        Register only around an operation that blocks the greenlet (a socket read or write):
        the exception lands wherever the greenlet waits.
        """
        self._waiting[greenlet] = (deadline, error)
        if self._timer is None:
            # Runs while operations are registered and stops at the first sweep that finds
            # none, so an idle worker is not woken; ref=False: it never keeps the loop alive.
            self._timer = self._loop.timer(SWEEP_INTERVAL, SWEEP_INTERVAL, ref=False)
            self._timer.start(self._sweep)

    def discard(self, greenlet: Any) -> None:
        """The operation of ``greenlet`` ended (or never blocked)."""
        self._waiting.pop(greenlet, None)

    @property
    def active(self) -> bool:
        """Whether the timer runs (tests check that an idle worker stops it)."""
        return self._timer is not None

    def _sweep(self) -> None:
        if not self._waiting:
            self._timer.close()
            self._timer = None
            return
        now = time.monotonic()
        late = [greenlet for greenlet, (deadline, _) in self._waiting.items() if deadline <= now]
        for greenlet in late:
            # Still registered: the hub runs only while every greenlet waits, so it is blocked
            # inside its operation, which is where the exception lands. (One thrown earlier in
            # this loop may have run on and ended another's operation: that one is skipped.)
            entry = self._waiting.pop(greenlet, None)
            if entry is not None and not greenlet.dead:
                greenlet.throw(entry[1]())


def deadlines() -> Deadlines:
    """The :class:`Deadlines` of the current thread's hub (made on first use)."""
    hub = gevent.get_hub()  # one per OS thread, each with its own loop
    found: Deadlines | None = getattr(hub, "_sse_run_deadlines", None)
    if found is None:
        found = Deadlines(hub.loop)
        hub._sse_run_deadlines = found
    return found
