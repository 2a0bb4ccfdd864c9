"""Bound the work on one device: N generations at a time, a queue, then 503.

A GPU runs one ``generate()`` well; two at once each run at half speed and hold twice the
memory. :class:`DeviceQueue` lets ``concurrency`` generations run, makes up to ``max_queue``
more wait their turn (first come, first served), and refuses the rest with 503 and
``Retry-After`` before the response starts.

Waiting happens on the hub side: a gevent semaphore under gunicorn's gevent worker (a waiting
request is a parked greenlet, the worker serves everything else), a ``threading`` one otherwise.
The semaphore is made lazily, in the process and mode that uses it: one made before gunicorn
forks, or before gevent patches, would belong to the wrong world.
"""

from __future__ import annotations

import os
from typing import Any

from ..concurrency import gevent_patched, new_semaphore
from ..errors import RequestError

__all__ = ["BUSY", "DeviceQueue", "Ticket"]

#: The message of the 503 for a full queue.
BUSY = "the model is busy: {running} generating, {waiting} waiting; retry later"


class Ticket:
    """One admitted request: :meth:`wait` for its turn, :meth:`release` when done (idempotent)."""

    def __init__(self, queue: DeviceQueue) -> None:
        self._queue = queue
        self._running = False
        self._released = False

    def wait(self) -> None:
        """Block this greenlet (or thread) until a slot is free, then hold it."""
        if self._running or self._released:
            return
        self._queue._semaphore().acquire()
        if self._released:  # released (the stream was closed) while waiting
            self._queue._semaphore().release()
            return
        self._running = True
        self._queue.waiting -= 1
        self._queue.running += 1

    def release(self) -> None:
        """Give the slot (or the place in the queue) back."""
        if self._released:
            return
        self._released = True
        if self._running:
            self._running = False
            self._queue.running -= 1
            self._queue._semaphore().release()
        else:
            self._queue.waiting -= 1


class DeviceQueue:
    """At most ``concurrency`` generations at a time and ``max_queue`` waiting; 503 beyond.

    ``retry_after`` is the ``Retry-After`` header of the 503, in seconds, and ``busy`` its message
    (``{running}`` and ``{waiting}`` filled in). ``running`` and ``waiting`` may be read at any
    time (for a health endpoint).
    """

    def __init__(
        self, concurrency: int = 1, max_queue: int = 8, retry_after: int = 5, *, busy: str = BUSY
    ) -> None:
        if concurrency < 1 or max_queue < 0 or retry_after < 0:
            raise ValueError("need concurrency >= 1, max_queue >= 0 and retry_after >= 0")
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.busy = busy
        self.running = 0
        self.waiting = 0
        self._made: tuple[int, bool, Any] | None = None

    def _semaphore(self) -> Any:
        key = (os.getpid(), gevent_patched())
        if self._made is None or self._made[:2] != key:
            self._made = (*key, new_semaphore(self.concurrency))
            self.running = self.waiting = 0
        return self._made[2]

    def admit(self) -> Ticket:
        """Take a place in the queue, or raise :class:`RequestError` (503) when it is full.

        Call it before the response starts; then :meth:`Ticket.wait` (in the stream) and
        :meth:`Ticket.release` (always, also when the stream never starts).
        """
        self._semaphore()  # a fork since the last request resets the counts
        if self.running + self.waiting >= self.concurrency + self.max_queue:
            raise RequestError(
                503,
                self.busy.format(running=self.running, waiting=self.waiting),
                headers={"Retry-After": str(self.retry_after)},
            )
        self.waiting += 1
        return Ticket(self)
