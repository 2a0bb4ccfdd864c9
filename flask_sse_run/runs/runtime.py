"""The runs of one app in this process: start them, cancel them, and keep their windows.

:class:`Runs` owns the app's :class:`~.store.RunStore` and the producers running in this
process. A janitor (one greenlet, or thread, per app, alive while there is anything to look
after) checks every ``JANITOR_INTERVAL`` seconds:

* a run produced here whose last client left ``window`` seconds ago (or that was started with
  none, ``Prefer: respond-async``) is cancelled, as a stream whose client left is;
* a cancel asked for through the store (``DELETE`` in another worker) reaches its producer;
* the store forgets ended runs past their TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ..concurrency import gevent_patched, spawn
from ..streaming import StreamOptions
from .ids import new_run_id
from .producer import Producer
from .store import RunStore

__all__ = ["JANITOR_INTERVAL", "Runs"]

#: How often windows, cancels and expiry are checked (seconds).
JANITOR_INTERVAL = 0.5
#: How often the store is told that runs produced here are alive (seconds).
TOUCH_INTERVAL = 10.0


class Runs:
    """Start, find and cancel the runs of one app; see the module docstring."""

    def __init__(self, store: RunStore, *, window: float) -> None:
        self.store = store
        self.window = window
        self.producers: dict[str, Producer] = {}
        self._janitor: Any = None
        self._touched = time.monotonic()

    def start(
        self, function: str, prefix: str, owner: str | None, source: Iterator[Any], options: StreamOptions
    ) -> str:
        """Record a run of ``source`` and start producing it; return its id.

        Raises :class:`~.store.StoreFull` or :class:`~.store.StoreUnavailable` (503) before
        anything runs.
        """
        run_id = new_run_id()
        self.store.create(run_id, function, prefix, owner)
        producer = Producer(run_id, source, self.store, options, self._ended)
        self.producers[run_id] = producer
        producer.start()
        self._ensure_janitor()
        return run_id

    def cancel(self, run_id: str) -> bool:
        """Cancel a run wherever it is produced; ``False`` if unknown.

        A producer in this process stops at once; one in another worker when its janitor next
        looks at the store.
        """
        found = self.store.request_cancel(run_id)
        producer = self.producers.get(run_id)
        if producer is not None:
            producer.cancel("cancelled")
        return found

    def _ended(self, run_id: str) -> None:
        self.producers.pop(run_id, None)

    def _ensure_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = spawn(self._look_after)

    def _look_after(self) -> None:
        sleep = _sleep()
        try:
            while self.producers or self.store.pending():
                sleep(JANITOR_INTERVAL)
                self.check()
        finally:
            self._janitor = None

    def check(self) -> None:
        """One round of the janitor (tests call it to avoid waiting)."""
        now = time.time()
        producers = list(self.producers.items())
        try:
            infos = self.store.get_many([run_id for run_id, _ in producers]) if producers else []
        except Exception:  # a store that went away: its producers find out when they append
            infos = []
        for (_, producer), info in zip(producers, infos, strict=False):
            if info is None or not info.running:
                continue
            if info.cancel_requested:
                producer.cancel("cancelled")
            elif info.idle_since is not None and now - info.idle_since >= self.window:
                producer.cancel("cancelled")
        try:
            self.store.expire()
            if time.monotonic() - self._touched >= TOUCH_INTERVAL:
                self._touched = time.monotonic()
                self.store.touch(list(self.producers))
        except Exception:
            pass  # tried again next round


def _sleep() -> Any:
    if gevent_patched():
        import gevent

        return gevent.sleep
    return time.sleep
