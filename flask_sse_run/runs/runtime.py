"""The runs of one app in this process: start them, cancel them, and keep their windows.

:class:`Runs` owns the app's :class:`~.store.RunStore` and the producers running in this
process. A janitor (one greenlet, or thread, per app, alive while there is anything to look
after) checks every ``JANITOR_INTERVAL`` seconds:

* the runs produced here beat their heart (:meth:`~.store.RunStore.heartbeat`: a shared store
  renews their leases with it), and what it answers is acted on: a run whose last client left
  ``window`` seconds ago (or that was started with none, ``Prefer: respond-async``) is
  cancelled, as a stream whose client left is; one that the store says has ended (a ``DELETE``
  in another worker, a lost lease) stops its producer, with no more writes;
* ends that the store could not take (it was away) are stored once it answers, until the run's
  keys would have expired anyway;
* the store forgets ended runs past their TTL; once the runs it forgot held ``TRIM_AFTER``
  bytes (at most every ``TRIM_EVERY`` seconds), glibc's ``malloc_trim(0)`` gives the freed
  memory back to the OS: glibc keeps it otherwise (600 expired runs of 1 MiB left a worker at
  669 MiB RSS; the call took it to 71 MiB, in 38 ms; see docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ..channels.hub import Hub
from ..concurrency import gevent_patched, raw_lock, spawn
from ..streaming import StreamOptions
from .endings import cancelled_event
from .ids import new_run_id
from .producer import Producer, Unfinished
from .store import RunStore

__all__ = ["JANITOR_INTERVAL", "TRIM_AFTER", "TRIM_EVERY", "Runs", "trim_heap"]

#: How often windows, cancels and expiry are checked (seconds).
JANITOR_INTERVAL = 0.5
#: How long an end the store could not take is tried again (seconds): then its keys are gone.
UNFINISHED_FOR = 300.0
#: Bytes of events of forgotten runs after which the janitor calls ``malloc_trim(0)``, and the
#: fewest seconds between two calls (each holds the worker for tens of ms with a large heap).
TRIM_AFTER = 64 << 20
TRIM_EVERY = 10.0


class Runs:
    """Start, find and cancel the runs of one app; see the module docstring."""

    def __init__(self, store: RunStore, *, window: float, outage: float = 10.0) -> None:
        self.store = store
        self.window = window
        self.outage = outage
        self.producers: dict[str, Producer] = {}
        # Ends the store did not take: run id -> (status, event, when to give up).
        self.unfinished: dict[str, tuple[str, bytes, float]] = {}
        #: The app's channels as this process follows them (their events live in ``store``).
        self.channels = Hub(store, outage=outage)
        self._janitor = False  # whether a janitor runs
        self._janitor_lock = raw_lock()  # threads may start runs at once: one janitor
        self._released = 0
        self._trimmed = -TRIM_EVERY

    def start(
        self, function: str, prefix: str, owner: str | None, source: Iterator[Any], options: StreamOptions
    ) -> str:
        """Record a run of ``source`` and start producing it; return its id.

        Raises :class:`~.store.StoreFull` or :class:`~.store.StoreUnavailable` (503) before
        anything runs.
        """
        run_id = new_run_id()
        self.store.create(run_id, function, prefix, owner)
        producer = Producer(run_id, source, self.store, options, self._ended, self.outage)
        self.producers[run_id] = producer
        producer.start()
        self.ensure_janitor()
        return run_id

    def cancel(self, run_id: str) -> bool:
        """Cancel a run wherever it is produced; ``False`` if unknown.

        The store ends it at once, with the event that says so, for every follower; a producer
        in this process stops at once, one in another worker at its next append or heartbeat.
        """
        found = self.store.cancel(run_id, cancelled_event("DELETE"))
        producer = self.producers.get(run_id)
        if producer is not None:
            producer.cancel("elsewhere")
        return found

    def _ended(self, run_id: str, unfinished: Unfinished | None) -> None:
        self.producers.pop(run_id, None)
        if unfinished is not None:
            status, event = unfinished
            self.unfinished[run_id] = (status, event, time.monotonic() + UNFINISHED_FOR)
            self.ensure_janitor()

    def ensure_janitor(self) -> None:
        """Start the janitor if it is not running (a publish on an in-process channel needs it
        to forget the channel once idle)."""
        with self._janitor_lock:
            if self._janitor:
                return
            # Marked before it starts: one with nothing to do ends at once, and its end must not
            # be overwritten by this mark (the janitor would then never start again).
            self._janitor = True
        spawn(self._look_after)

    def _look_after(self) -> None:
        sleep = _sleep()
        try:
            # Also until the memory of the runs it forgot is given back.
            while self.producers or self.unfinished or self.store.pending() or self._released >= TRIM_AFTER:
                sleep(JANITOR_INTERVAL)
                self.check()
        finally:
            with self._janitor_lock:
                self._janitor = False
        if self.producers or self.unfinished:
            # Work that came while it was ending (in threads: a run started just then, which
            # found it still marked).
            self.ensure_janitor()

    def check(self) -> None:
        """One round of the janitor (tests call it to avoid waiting)."""
        now = time.time()
        producers = list(self.producers.items())
        # An unfinished end's run beats too: its lease holds until the end is stored, so it is
        # not taken for lost meanwhile.
        beating = [run_id for run_id, _ in producers] + list(self.unfinished)
        try:
            infos = self.store.heartbeat(beating) if beating else {}
        except Exception:  # a store that is away: its producers find out when they append
            infos = {}
        for run_id, producer in producers:
            if run_id not in infos:
                continue  # nothing read this round
            info = infos[run_id]
            if info is None or not info.running:
                producer.cancel("elsewhere")  # ended by the store: a DELETE, a lost lease, gone
            elif info.idle_since is not None and now - info.idle_since >= self.window:
                producer.cancel("cancelled")
        self._finish_unfinished()
        try:
            self.store.expire()
        except Exception:
            pass  # tried again next round
        with self._janitor_lock:  # a test's own call may race the janitor's
            self._released += self.store.released()
            clock = time.monotonic()
            due = self._released >= TRIM_AFTER and clock - self._trimmed >= TRIM_EVERY
            if due:
                self._released, self._trimmed = 0, clock
        if due:
            trim_heap()

    def _finish_unfinished(self) -> None:
        for run_id, (status, event, give_up) in list(self.unfinished.items()):
            try:
                self.store.finish(run_id, status, event)
            except Exception:
                if time.monotonic() < give_up:
                    continue  # still away: next round
            del self.unfinished[run_id]


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim(0)``); ``False``
    where there is no such call (another libc)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None


def _sleep() -> Any:
    if gevent_patched():
        import gevent

        return gevent.sleep
    return time.sleep
