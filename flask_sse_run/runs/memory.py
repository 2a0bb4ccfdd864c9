"""The in-process run store: runs' events in this worker's memory (the default).

Nothing to run beside the app, and the fastest store; but a run lives in the worker that started
it: with several gunicorn workers (or replicas) a reconnect that lands in another worker does not
find it. Use the Redis store (``SSE_RUN_REDIS_URL``) there.

Bounds: each run holds at most ``max_events`` events and ``max_bytes`` bytes of them (the
oldest go first; the newest is always kept), and the store at most ``max_runs`` runs, running or
ended (:class:`~.store.StoreFull` beyond). Ended runs are forgotten ``ttl`` seconds after they end.

``budget`` bounds the bytes of every run's events together (``SSE_RUN_MAX_BYTES``): the per-run
bounds multiply by the runs held, and runs are cheap to start. Ended runs make room first, oldest
first, before their TTL (a reconnect then finds nothing, a follower reading one gets
``RunVanished``): when an append takes the total over the budget, and when a new run would not
find room for one run's bound (``max_bytes``). A new run that finds no room even so (running
runs fill the budget) is refused (:class:`~.store.StoreFull`). A running run keeps its own bound
while the budget holds; once running runs alone overfill it (many started at once, before any
held much), a run that appends drops its oldest events down to its share of the budget (the
budget over the running runs; its newest event always kept): a reader behind learns how many it
missed, as for the per-run bound. The total can then stay over the budget until the runs above
their share append or end, but never beyond twice the budget (plus each run's newest event):
since the runs last held less than the budget (no run is admitted meanwhile), those that
appended hold at most their share, the others what they held then. The budget counts the
events' bytes: Python's own cost of each held event (about 100 bytes) comes on top.

Channels (:meth:`open_channel`, :meth:`publish`) are runs too, running with no producer: each
keeps its last ``channel_history`` events (within ``max_bytes``), counts against ``max_runs``
and the budget, and is forgotten ``channel_ttl`` seconds after its last publish once no client
follows it.

Safe for greenlets and threads: every change holds one lock, and waiters block on a per-run
event that each change replaces.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from ..channels.names import CHANNEL_PREFIX
from ..concurrency import new_event, raw_lock
from .ids import event_id
from .store import RUNNING, RunInfo, RunSlice, RunStore, StoreFull

__all__ = ["MemoryRunStore"]


_DATA = itemgetter(1)


class _Run:
    __slots__ = (
        "changed",
        "clients",
        "ended_at",
        "events",
        "function",
        "idle_since",
        "last_seq",
        "limit",
        "nbytes",
        "owner",
        "prefix",
        "status",
        "touched",
    )

    def __init__(self, function: str, prefix: str, owner: str | None) -> None:
        self.function = function
        self.prefix = prefix
        self.owner = owner
        self.status = RUNNING
        self.events: deque[tuple[int, bytes]] = deque()
        self.nbytes = 0
        self.last_seq = 0
        self.clients = 0
        self.idle_since: float | None = time.time()
        self.ended_at = 0.0
        self.changed: Any = None  # made by the first waiter: most runs are never waited on
        self.limit = 0  # the most events held; 0: the store's max_events (a channel has its own)
        self.touched = 0.0  # a channel's last publish or open (time.time())

    def wake(self) -> None:
        changed, self.changed = self.changed, None
        if changed is not None:
            changed.set()


class MemoryRunStore(RunStore):
    """Runs in this process's memory; see the module docstring."""

    def __init__(
        self,
        *,
        max_events: int,
        max_bytes: int,
        max_runs: int,
        ttl: float,
        budget: int | None = None,
        channel_history: int = 1000,
        channel_ttl: float = 600.0,
    ) -> None:
        self.max_events = max_events
        self.channel_history = channel_history
        self.channel_ttl = channel_ttl
        self.max_bytes = max_bytes
        self.max_runs = max_runs
        self.ttl = ttl
        #: Most bytes of events all runs hold together (``None``: ``max_runs * max_bytes``).
        self.budget = budget if budget is not None else max_runs * max_bytes
        if self.budget < max_bytes:
            raise ValueError("the budget must hold one run's max_bytes at least")
        self._runs: dict[str, _Run] = {}
        # The ended runs in the order they ended: the oldest is the first to go.
        self._ended: dict[str, _Run] = {}
        self._channels: dict[str, _Run] = {}
        self._nbytes = 0
        self._released = 0
        # An OS lock also under gevent: it is held only around plain dict and deque work, where
        # no greenlet switches, and costs half of gevent's.
        self._lock = raw_lock()

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def nbytes(self) -> int:
        """Bytes of events held by all runs together."""
        return self._nbytes

    def create(self, run_id: str, function: str, prefix: str, owner: str | None) -> None:
        """Record a new run; :class:`StoreFull` when ``max_runs`` are held, or the ``budget`` has
        no room for one run's ``max_bytes`` (ended runs are forgotten first, oldest first)."""
        with self._lock:
            self._admit()
            self._runs[run_id] = _Run(function, prefix, owner)

    def _admit(self) -> None:
        # Room for one more run (under the lock), or StoreFull.
        if len(self._runs) >= self.max_runs:
            self._expire(time.time())
            if len(self._runs) >= self.max_runs:
                raise StoreFull(self.max_runs, retry_after=self._retry_after())
        room = self.budget - self.max_bytes
        if self._nbytes > room:
            self._forget_ended(room)
            if self._nbytes > room:
                raise StoreFull(self.budget, retry_after=self._retry_after(), what="bytes of runs' events")

    def _retry_after(self) -> int:
        return max(1, round(self.ttl / 2))

    def append(self, run_id: str, events: Sequence[tuple[int, bytes]]) -> bool:
        """Add events; the oldest are dropped beyond ``max_events`` or ``max_bytes``."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.status != RUNNING:
                return False
            self._add(run, events)
            run.wake()
            return True

    def _add(self, run: _Run, events: Sequence[tuple[int, bytes]]) -> None:
        held = run.events
        held.extend(events)
        nbytes = run.nbytes + sum(map(len, map(_DATA, events)))
        run.last_seq = events[-1][0]
        # A firehose's every append drops as many as it adds: count first, then pop in a plain
        # loop (a condition re-evaluated per event cost more than the append itself).
        popleft = held.popleft
        for _ in range(len(held) - (run.limit or self.max_events)):
            nbytes -= len(popleft()[1])
        while nbytes > self.max_bytes and len(held) > 1:
            nbytes -= len(popleft()[1])
        self._nbytes += nbytes - run.nbytes
        run.nbytes = nbytes
        if self._nbytes > self.budget:
            self._over_budget(run)

    def _over_budget(self, run: _Run) -> None:
        """Back within the budget: ended runs go, oldest first; then ``run``, which has just
        added and is running, drops its oldest events down to its share."""
        self._forget_ended(self.budget)
        if self._nbytes <= self.budget:
            return
        share = self.budget // max(1, len(self._runs) - len(self._ended))
        held, nbytes = run.events, run.nbytes
        popleft = held.popleft
        while self._nbytes > self.budget and nbytes > share and len(held) > 1:
            dropped = len(popleft()[1])
            nbytes -= dropped
            self._nbytes -= dropped
        run.nbytes = nbytes

    def _forget_ended(self, limit: int) -> None:
        """Forget ended runs, oldest first, until the runs hold ``limit`` bytes at most."""
        ended = self._ended
        while ended and self._nbytes > limit:
            self._forget(next(iter(ended)))

    def _forget(self, run_id: str) -> None:
        run = self._runs.pop(run_id)
        self._ended.pop(run_id, None)
        self._channels.pop(run_id, None)
        self._nbytes -= run.nbytes
        self._released += run.nbytes

    def finish(self, run_id: str, status: str, event: bytes = b"") -> bool:
        """End the run with ``event`` last; waiting readers wake."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.status != RUNNING:
                return False
            self._end(run_id, run, status, event)
            return True

    def _end(self, run_id: str, run: _Run, status: str, event: bytes) -> None:
        if event:
            seq = run.last_seq + 1
            self._add(run, [(seq, b"id: " + event_id(run_id, seq).encode() + b"\n" + event)])
        run.status = status
        run.ended_at = time.time()
        self._ended[run_id] = run
        run.wake()

    def open_channel(self, run_id: str) -> int:
        """The channel's last seq; made (and admitted as a run) if it is not held."""
        with self._lock:
            return self._channel(run_id).last_seq

    def publish(self, run_id: str, id_prefix: bytes, event: bytes) -> int:
        """Append ``event`` to the channel with the next seq; waiting readers wake."""
        with self._lock:
            run = self._channel(run_id)
            seq = run.last_seq + 1
            self._add(run, [(seq, b"id: %s%d\n%s" % (id_prefix, seq, event))])
            run.wake()
            return seq

    def _channel(self, run_id: str) -> _Run:
        run = self._channels.get(run_id)
        if run is None:
            self._admit()
            run = self._runs[run_id] = self._channels[run_id] = _Run("", CHANNEL_PREFIX, None)
            run.limit = self.channel_history
        run.touched = time.time()
        return run

    def get(self, run_id: str) -> RunInfo | None:
        """The run's state, or ``None``."""
        run = self._runs.get(run_id)
        if run is None or self._expired(run, time.time()):
            return None
        return RunInfo(
            run_id=run_id,
            function=run.function,
            prefix=run.prefix,
            owner=run.owner,
            status=run.status,
            last_seq=run.last_seq,
            clients=run.clients,
            idle_since=run.idle_since,
        )

    def read(self, run_id: str, after: int, limit: int) -> RunSlice | None:
        """Up to ``limit`` events after ``after``, and how many of those are no longer held."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or self._expired(run, time.time()):
                return None
            held = run.events
            if not held or held[-1][0] <= after:
                return RunSlice((), 0, run.status, run.last_seq)
            first = held[0][0]
            missed = max(0, first - 1 - after)
            # Seqs are consecutive: what follows the position is the deque's last `newer`
            # entries, taken from the right end (a deque is indexed in O(distance from an end),
            # and a live reader is near the newest).
            newer = min(len(held), held[-1][0] - max(after, first - 1))
            skip = len(held) - newer
            if newer > limit:  # far behind: walk from the left, only as far as needed
                events = list(itertools.islice(held, skip, skip + limit))
            else:
                events = list(itertools.islice(reversed(held), newer))
                events.reverse()
            return RunSlice(events, missed, run.status, run.last_seq)

    def wait(self, run_id: str, after: int, timeout: float, mark: object = None) -> None:
        """Block until an event after ``after`` exists, the run ended, or ``timeout``."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.status != RUNNING or run.last_seq > after:
                return
            if run.changed is None:
                run.changed = new_event()
            changed = run.changed
        changed.wait(timeout)

    def attach(self, run_id: str) -> None:
        """A client tails the run."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.clients += 1
                run.idle_since = None

    def detach(self, run_id: str) -> None:
        """A client left; the last one leaving marks the run idle."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.clients -= 1
                if run.clients == 0:
                    run.idle_since = time.time()

    def cancel(self, run_id: str, event: bytes) -> bool:
        """End the run as cancelled, ``event`` last (the runtime stops its producer)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or self._expired(run, time.time()):
                return False
            if run.status == RUNNING:
                self._end(run_id, run, "cancelled", event)
            return True

    def expire(self) -> None:
        """Forget ended runs older than ``ttl``."""
        with self._lock:
            self._expire(time.time())

    def pending(self) -> bool:
        """Whether any run is held (the janitor expires ended ones)."""
        return bool(self._runs)

    def released(self) -> int:
        """Bytes of events of the runs forgotten since the last call."""
        with self._lock:
            released, self._released = self._released, 0
            return released

    def _expire(self, now: float) -> None:
        for run_id in [run_id for run_id, run in self._ended.items() if self._expired(run, now)]:
            self._forget(run_id)
        idle = now - self.channel_ttl
        for run_id in [r for r, run in self._channels.items() if run.clients <= 0 and run.touched < idle]:
            self._forget(run_id)

    def _expired(self, run: _Run, now: float) -> bool:
        return run.status != RUNNING and now - run.ended_at > self.ttl
