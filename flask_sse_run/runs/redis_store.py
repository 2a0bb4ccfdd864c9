"""The Redis run store: runs shared by every worker and replica of an app (``SSE_RUN_REDIS_URL``).

Keys, under ``SSE_RUN_REDIS_PREFIX`` (default ``sse-run:``), so that several apps share one Redis:

* ``<prefix>run:<run_id>``: a hash, the run's state (``function``, ``prefix``, ``owner``,
  ``status``, ``last_seq``, ``clients``, ``idle_since``, ``cancel``);
* ``<prefix>run:<run_id>:events``: a stream, one entry per batch of events the producer
  appends, with the entry id ``<last seq of the batch>-0`` and the fields ``s`` (its first seq),
  ``d`` (the encoded events, one after the other) and ``o`` (their lengths, 32-bit integers), so
  a position inside a batch is exact; ``XADD ... MINID ~`` keeps about the last
  ``SSE_RUN_RESUME_MAX_EVENTS`` events;
* ``<prefix>changed``: a channel; every append and every end publishes the run's id on it.

Both keys expire: while the run is produced, ``RUNNING_TTL`` seconds after the producer last
touched them (so a worker killed mid-run does not leave them forever), then
``SSE_RUN_RESUME_TTL`` seconds after the end.

Round trips: an append is one script call per batch of events (one ``XADD``, the hash's
``last_seq``, the expiries, the announcement), whatever the batch holds; a read is one pipelined
round trip, and hands on each batch whole (a chunk), cut only where the position falls inside
it. Every worker has one subscriber to the channel, a greenlet (or thread) shared by every run
its responses wait for; a waiting response is woken by its run's announcement and reads again.
(``XREAD BLOCK`` on every waited-for stream would also be one connection, but costs Redis and the
worker work in proportion to the number of streams at every call, and must be restarted each
time a response starts waiting on another run: with a thousand streams, a thousand times a
second. An announcement costs the same whatever the number of streams.) A cancel (``DELETE``
anywhere) sets the hash's ``cancel`` field, which the producing worker's janitor reads twice a
second; so does the window, from ``clients`` and ``idle_since``.

Every call has a timeout; one that fails raises :class:`~.store.StoreUnavailable` (503). Redis
coming back needs no restart: redis-py reconnects, and the subscriber subscribes again (waking
every waiter to read again, so an announcement made while it was away is not missed). Deliberate
limits: the byte bound of the in-process store is not applied (the bound counts events), and a
worker killed while its clients were attached leaves their count up, so that run's window waits
for its natural end.
"""

from __future__ import annotations

import itertools
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..concurrency import new_event, spawn
from .store import RUNNING, RunInfo, RunSlice, RunStore, StoreFull, StoreUnavailable

__all__ = ["POOL_SIZE", "RUNNING_TTL", "TIMEOUT", "RedisRunStore"]

#: Seconds every Redis call may take (connect, read or write) before the store is unavailable.
TIMEOUT = 2.0
#: Connections each worker's calls share (not the subscriber's own); a call waits for a free one.
POOL_SIZE = 50
#: Seconds a running run's keys live past the producer's last touch (it touches them at every
#: append and every few seconds while idle).
RUNNING_TTL = 120
#: How long the subscriber waits for a message before it looks whether anyone still waits (s).
LISTEN_TIMEOUT = 5.0
# KEYS: the hash, the stream, the channel. ARGV: min id kept, TTL, last seq, first seq, the
# events' bytes, their lengths, the run id.
_APPEND = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[1], ARGV[3] .. '-0', 's', ARGV[4], 'd', ARGV[5], 'o', ARGV[6])
redis.call('HSET', KEYS[1], 'last_seq', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[7])
return 1
"""
_DETACH = """
local left = redis.call('HINCRBY', KEYS[1], 'clients', -1)
if left <= 0 then
  redis.call('HSET', KEYS[1], 'clients', 0, 'idle_since', ARGV[1])
end
return left
"""
_ATTACH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'clients', 1)
  redis.call('HDEL', KEYS[1], 'idle_since')
end
return 1
"""


class RedisRunStore(RunStore):
    """Runs in Redis; see the module docstring. ``url`` is a ``redis://`` or ``unix://`` URL."""

    def __init__(
        self, url: str, *, prefix: str, max_events: int, max_runs: int, ttl: float, window: float
    ) -> None:
        import redis

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # ValueError and AttributeError too: redis-py's reading a socket that close() closed
        # (its buffer gone) from another thread.
        self._listen_errors: tuple[type[BaseException], ...] = (*self._errors, ValueError, AttributeError)
        # Nothing connects here: a Redis that is down at start-up makes requests 503, not the
        # app fail to start, and serves again once it is back.
        # A pool that makes a call wait (up to TIMEOUT) for a free connection: redis-py's
        # default pool raises "Too many connections" past 100, and a thousand runs starting at
        # once got 503s. A ``max_connections`` in the URL's query overrides the size.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry_on_timeout=False,
        )
        self._redis = redis.Redis(connection_pool=pool)
        # The subscriber waits up to LISTEN_TIMEOUT for a message: room for that.
        self._reader_client = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT + LISTEN_TIMEOUT, socket_connect_timeout=TIMEOUT
        )
        self._channel = f"{prefix}changed"
        self.prefix = prefix
        self.max_events = max_events
        self.max_runs = max_runs
        self.ttl = ttl
        self._running_ttl = max(RUNNING_TTL, int(window * 2) + 10)
        self._detach = self._redis.register_script(_DETACH)
        self._attach = self._redis.register_script(_ATTACH)
        self._append = self._redis.register_script(_APPEND)
        self._local: set[str] = set()  # runs produced by this process, still running
        self._waiters: dict[str, list[Any]] = {}  # run id -> events of the greenlets waiting
        # Runs this process's responses follow: how many clients, and how many announcements
        # the subscriber heard for each (a read's mark; see wait).
        self._followers: dict[str, int] = {}
        # Values from one increasing count, so that an entry made again never equals an old mark.
        self._heard: dict[str, int] = {}
        self._announcements = itertools.count(1)
        self._subscription = 0  # counts subscriptions; 0 while not subscribed
        # Held only around these dicts (no I/O under it): the subscriber may be a thread.
        self._lock = threading.Lock()
        self._listening = False
        self._reader: Any = None
        self._closed = False

    # -- keys and errors -------------------------------------------------------------------------

    def _key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def _events_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:events"

    @contextmanager
    def _call(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise StoreUnavailable() from exc

    # -- the producer's side ---------------------------------------------------------------------

    def create(self, run_id: str, function: str, prefix: str, owner: str | None) -> None:
        """Record a new run; :class:`StoreFull` when this process produces ``max_runs``."""
        if len(self._local) >= self.max_runs:
            raise StoreFull(self.max_runs, retry_after=5)
        fields: dict[Any, Any] = {
            "function": function,
            "prefix": prefix,
            "owner": owner or "",
            "status": RUNNING,
            "last_seq": 0,
            "clients": 0,
            "idle_since": repr(time.time()),
        }
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(self._key(run_id), mapping=fields)
            pipe.expire(self._key(run_id), self._running_ttl)
            pipe.execute()
        self._local.add(run_id)

    def append(self, run_id: str, events: Sequence[tuple[int, bytes]]) -> None:
        """One round trip, one stream entry for the whole batch (a script, so nothing is added
        to a run that ended): the events, the run's ``last_seq``, the keys' expiry."""
        first, last = events[0][0], events[-1][0]
        lengths = array("I", [len(data) for _, data in events])
        args: list[int | bytes | str] = [
            max(1, last - self.max_events + 1),  # MINID: what falls out of the bound
            self._running_ttl,
            last,
            first,
            b"".join([data for _, data in events]),
            lengths.tobytes(),
            run_id,
        ]
        with self._call():
            self._append(keys=[self._key(run_id), self._events_key(run_id), self._channel], args=args)

    def finish(self, run_id: str, status: str) -> None:
        """Mark the run ended, tell its readers, and start the TTL."""
        self._local.discard(run_id)
        key, events_key = self._key(run_id), self._events_key(run_id)
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, "status", status)
            ttl_ms = max(1, int(self.ttl * 1000))
            pipe.pexpire(key, ttl_ms)
            pipe.pexpire(events_key, ttl_ms)
            pipe.publish(self._channel, run_id)
            pipe.execute()

    def touch(self, run_ids: Sequence[str]) -> None:
        """Keep running runs' keys alive (the janitor calls this while they are idle)."""
        if not run_ids:
            return
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            for run_id in run_ids:
                pipe.expire(self._key(run_id), self._running_ttl)
                pipe.expire(self._events_key(run_id), self._running_ttl)
            pipe.execute()

    # -- the readers' side -----------------------------------------------------------------------

    def get(self, run_id: str) -> RunInfo | None:
        """The run's state, or ``None``."""
        return self.get_many([run_id])[0]

    def get_many(self, run_ids: Sequence[str]) -> list[RunInfo | None]:
        """The states of several runs in one round trip (the janitor's twice a second)."""
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            for run_id in run_ids:
                pipe.hgetall(self._key(run_id))
            found: list[dict[bytes, bytes]] = pipe.execute()
        return [_info(run_id, fields) for run_id, fields in zip(run_ids, found, strict=True)]

    def read(self, run_id: str, after: int, limit: int) -> RunSlice | None:
        """One round trip: the state and up to ``limit`` batches holding events after ``after``."""
        mark = self._mark(run_id)  # before the round trip: a change made during it counts
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(self._key(run_id), "status", "last_seq")
            pipe.xrange(self._events_key(run_id), f"{after + 1}-0", "+", count=limit)
            (status, last_seq), entries = pipe.execute()
        if status is None:
            return None
        events = [_chunk(fields, after) for _, fields in entries]
        # The first batch after the position starts later than the next seq: the ones between
        # were trimmed away.
        missed = max(0, int(entries[0][1][b"s"]) - 1 - after) if entries else 0
        return RunSlice(events, missed, status.decode(), int(last_seq or 0), mark)

    def _mark(self, run_id: str) -> tuple[int, int] | None:
        # What the subscriber has heard of the run, if it listens and counts for this run.
        with self._lock:
            heard = self._heard.get(run_id)
        if heard is None or not self._subscription:
            return None
        return (self._subscription, heard)

    def wait(self, run_id: str, after: int, timeout: float, mark: object = None) -> None:
        """Wait for the run to change, through the worker's one subscriber.

        Each round registers, then makes sure no change slipped in since the caller's read
        began: with that read's ``mark``, by what the subscriber has heard since (the same
        subscription and count of announcements: no round trip, since every change is announced
        after it is stored); without one, by asking Redis (one ``HMGET``). A wake-up that changed
        nothing (the subscriber waking everyone after it reconnected) waits on.
        """
        deadline = time.monotonic() + timeout
        while True:
            event = new_event()
            with self._lock:
                self._waiters.setdefault(run_id, []).append(event)
            try:
                self._ensure_reader()
                if mark is not None:
                    if mark != self._mark(run_id):
                        return  # heard of a change since the read began: read again
                else:
                    with self._call():
                        status, last_seq = self._redis.hmget(self._key(run_id), "status", "last_seq")
                    if status is None or status != b"running" or int(last_seq or 0) > after:
                        return
                left = deadline - time.monotonic()
                if left <= 0 or not event.wait(left):
                    return
            finally:
                with self._lock:
                    waiting = self._waiters.get(run_id)
                    if waiting is not None:
                        if event in waiting:
                            waiting.remove(event)
                        if not waiting:
                            del self._waiters[run_id]

    def attach(self, run_id: str) -> None:
        """A client follows the run (in any worker)."""
        with self._call():
            self._attach(keys=[self._key(run_id)])
        with self._lock:
            self._followers[run_id] = self._followers.get(run_id, 0) + 1
            if run_id not in self._heard:
                self._heard[run_id] = next(self._announcements)

    def detach(self, run_id: str) -> None:
        """A client left; the last one leaving marks the run idle (its window starts)."""
        with self._lock:
            left = self._followers.get(run_id, 1) - 1
            if left > 0:
                self._followers[run_id] = left
            else:
                self._followers.pop(run_id, None)
                self._heard.pop(run_id, None)
        with self._call():
            self._detach(keys=[self._key(run_id)], args=[repr(time.time())])

    def request_cancel(self, run_id: str) -> bool:
        """Flag the run for cancelling; its producer's worker sees the flag within a second."""
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            pipe.exists(self._key(run_id))
            pipe.hsetnx(self._key(run_id), "cancel", "1")
            exists, _ = pipe.execute()
            if not exists:  # HSETNX made a stray hash: remove it
                self._redis.delete(self._key(run_id))
        return bool(exists)

    def close(self) -> None:
        """Close the connections (the subscriber stops at its next wake-up)."""
        self._closed = True
        self._redis.close()
        self._redis.connection_pool.disconnect()  # a pool passed in is not closed with its client
        self._reader_client.close()

    # -- the shared subscriber ------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        # Started again if it ended (by an error it does not expect), so waits never rely on a
        # subscriber that is gone.
        if not self._listening and not self._closed:
            self._listening = True
            self._reader = spawn(self._listen)

    def _listen(self) -> None:
        # Started by the first wait and kept for the store's life: one per worker, idle cheaply.
        try:
            self._subscribe_and_listen()
        finally:
            self._subscription = 0  # marks stop counting: waits ask Redis until it is back
            self._listening = False

    def _subscribe_and_listen(self) -> None:
        subscriptions = 0
        while not self._closed:
            pubsub = self._reader_client.pubsub()
            try:
                pubsub.subscribe(self._channel)
                while not self._closed:
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Subscribed now: a change announced before went unheard by these.
                        self._subscription = subscriptions = subscriptions + 1
                        self._wake(list(self._waiters))
                    elif message["type"] == "message":
                        run_id = message["data"].decode()
                        with self._lock:
                            if run_id in self._heard:  # followed here: a change for the marks
                                self._heard[run_id] = next(self._announcements)
                        self._wake([run_id])
            except self._listen_errors:
                self._subscription = 0  # nothing is heard until subscribed again
                if self._closed:
                    return
                # Redis gone: every waiter reads again (and reports it); then resubscribe.
                self._wake(list(self._waiters))
                _sleep(0.5)
            finally:
                pubsub.close()

    def _wake(self, run_ids: Sequence[str]) -> None:
        with self._lock:
            events = [event for run_id in run_ids for event in self._waiters.pop(run_id, ())]
        for event in events:
            event.set()


def _info(run_id: str, fields: dict[bytes, bytes]) -> RunInfo | None:
    if not fields:
        return None
    text = {key.decode(): value.decode() for key, value in fields.items()}
    return RunInfo(
        run_id=run_id,
        function=text.get("function", ""),
        prefix=text.get("prefix", ""),
        owner=text.get("owner") or None,
        status=text.get("status", RUNNING),
        last_seq=int(text.get("last_seq", 0)),
        clients=int(text.get("clients", 0)),
        idle_since=float(text["idle_since"]) if text.get("idle_since") else None,
        cancel_requested=text.get("cancel") == "1",
    )


def _chunk(fields: dict[bytes, bytes], after: int) -> tuple[int, bytes]:
    """``(last seq, bytes)`` of the events of one stream entry (a batch) above ``after``."""
    lengths = array("I")
    lengths.frombytes(fields[b"o"])
    first, data = int(fields[b"s"]), fields[b"d"]
    last = first + len(lengths) - 1
    if first > after:
        return last, data
    return last, data[sum(lengths[: after - first + 1]) :]  # the position falls inside it


def _sleep(seconds: float) -> None:
    from ..concurrency import gevent_patched

    if gevent_patched():
        import gevent

        gevent.sleep(seconds)
    else:
        time.sleep(seconds)
