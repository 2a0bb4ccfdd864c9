"""The Redis run store: runs shared by every worker and replica of an app (``SSE_RUN_REDIS_URL``).

Keys, under ``SSE_RUN_REDIS_PREFIX`` (default ``sse-run:``), so that several apps share one Redis:

* ``<prefix>run:<run_id>``: a hash, the run's state (``function``, ``prefix``, ``owner``,
  ``status``, ``last_seq``, ``clients``, ``idle_since``, ``cancel``);
* ``<prefix>run:<run_id>:events``: a stream, one entry per batch of events the producer
  appends, with the entry id ``<last seq of the batch>-0`` and the fields ``s`` (its first seq),
  ``d`` (the encoded events, one after the other) and ``o`` (their lengths, 32-bit integers), so
  a position inside a batch is exact; ``XADD ... MINID ~`` keeps about the last
  ``SSE_RUN_RESUME_MAX_EVENTS`` events. When the run ends, one more entry, ``<last seq>-1``,
  marks the end (it wakes blocked readers).

Both keys expire: while the run is produced, ``RUNNING_TTL`` seconds after the producer last
touched them (so a worker killed mid-run does not leave them forever), then
``SSE_RUN_RESUME_TTL`` seconds after the end.

Round trips: an append is one script call per batch of events (one ``XADD``, the hash's
``last_seq``, the expiries), whatever the batch holds; a read is one pipelined round trip, and
hands on each batch whole (a chunk), cut only where the position falls inside it. Every worker
has one reader, a greenlet (or thread) doing ``XREAD BLOCK`` on every run some local response waits for; a
response that starts waiting on a new run unblocks it (``CLIENT UNBLOCK``) so that the next read
includes that run. A cancel (``DELETE`` anywhere) sets the hash's ``cancel`` field, which the
producing worker's janitor reads twice a second; so does the window, from ``clients`` and
``idle_since``.

Every call has a timeout; one that fails raises :class:`~.store.StoreUnavailable` (503). Redis
coming back needs no restart: redis-py reconnects. Deliberate limits: the byte bound of the
in-process store is not applied (the bound counts events), and a worker killed while its
clients were attached leaves their count up, so that run's window waits for its natural end.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..concurrency import new_event, spawn
from .store import RUNNING, RunInfo, RunSlice, RunStore, StoreFull, StoreUnavailable

__all__ = ["RUNNING_TTL", "TIMEOUT", "RedisRunStore"]

#: Seconds every Redis call may take (connect, read or write) before the store is unavailable.
TIMEOUT = 2.0
#: Seconds a running run's keys live past the producer's last touch (it touches them at every
#: append and every few seconds while idle).
RUNNING_TTL = 120
#: How long the reader's ``XREAD`` blocks before it looks at its list of runs again (ms).
BLOCK_MS = 5000
# ARGV: min id kept, TTL, last seq, first seq, the events' bytes, their lengths.
_APPEND = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[1], ARGV[3] .. '-0', 's', ARGV[4], 'd', ARGV[5], 'o', ARGV[6])
redis.call('HSET', KEYS[1], 'last_seq', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
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
        # Nothing connects here: a Redis that is down at start-up makes requests 503, not the
        # app fail to start, and serves again once it is back.
        self._redis = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry_on_timeout=False
        )
        # The reader blocks in XREAD up to BLOCK_MS: its own connection, with room for that.
        self._reader_client = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT + BLOCK_MS / 1000, socket_connect_timeout=TIMEOUT
        )
        self._reader_connection: Any = None
        self.prefix = prefix
        self.max_events = max_events
        self.max_runs = max_runs
        self.ttl = ttl
        self._running_ttl = max(RUNNING_TTL, int(window * 2) + 10)
        self._detach = self._redis.register_script(_DETACH)
        self._attach = self._redis.register_script(_ATTACH)
        self._append = self._redis.register_script(_APPEND)
        self._local: set[str] = set()  # runs produced by this process, still running
        self._waiters: dict[str, list[tuple[int, Any]]] = {}  # events key -> (after, event)
        self._reading: set[str] = set()  # the keys of the XREAD in progress
        self._reader: Any = None
        self._reader_id: int | None = None
        self._reader_wake = new_event()

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
        args: list[int | bytes] = [
            max(1, last - self.max_events + 1),  # MINID: what falls out of the bound
            self._running_ttl,
            last,
            first,
            b"".join([data for _, data in events]),
            lengths.tobytes(),
        ]
        with self._call():
            self._append(keys=[self._key(run_id), self._events_key(run_id)], args=args)

    def finish(self, run_id: str, status: str) -> None:
        """Mark the run ended, wake its readers (the end entry), and start the TTL."""
        self._local.discard(run_id)
        key, events_key = self._key(run_id), self._events_key(run_id)
        with self._call():
            last_seq = int(self._redis.hget(key, "last_seq") or 0)
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, "status", status)
            pipe.xadd(events_key, {"end": status}, id=f"{last_seq}-1")
            ttl_ms = max(1, int(self.ttl * 1000))
            pipe.pexpire(key, ttl_ms)
            pipe.pexpire(events_key, ttl_ms)
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
        """One round trip: the state, the oldest entry held, and up to ``limit`` events after."""
        events_key = self._events_key(run_id)
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(self._key(run_id), "status", "last_seq")
            pipe.xrange(events_key, "-", "+", count=1)
            pipe.xrange(events_key, f"{after + 1}-0", "+", count=limit)
            (status, last_seq), oldest, entries = pipe.execute()
        if status is None:
            return None
        events = [_chunk(fields, after) for _, fields in entries if b"d" in fields]  # not the end entry
        missed = 0
        if events and oldest and b"s" in oldest[0][1]:
            missed = max(0, int(oldest[0][1][b"s"]) - 1 - after)
        return RunSlice(events, missed, status.decode(), int(last_seq or 0))

    def wait(self, run_id: str, after: int, timeout: float) -> None:
        """Wait for an entry after ``after`` through the worker's one shared reader."""
        key = self._events_key(run_id)
        event = new_event()
        entry = (after, event)
        self._waiters.setdefault(key, []).append(entry)
        try:
            self._ensure_reader()
            if key not in self._reading:
                self._unblock_reader()
            event.wait(timeout)
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                if entry in waiting:
                    waiting.remove(entry)
                if not waiting:
                    del self._waiters[key]

    def attach(self, run_id: str) -> None:
        """A client follows the run (in any worker)."""
        with self._call():
            self._attach(keys=[self._key(run_id)])

    def detach(self, run_id: str) -> None:
        """A client left; the last one leaving marks the run idle (its window starts)."""
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
        """Close the connections (the reader stops at its next wake-up)."""
        self._redis.close()
        self._reader_client.close()

    # -- the shared reader -----------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._reader is None:
            self._reader = spawn(self._read_forever)

    def _unblock_reader(self) -> None:
        reader_id = self._reader_id
        if reader_id is None:
            self._reader_wake.set()
            return
        try:
            self._redis.client_unblock(reader_id)
        except self._errors:
            pass  # the reader times out on its own: the new run joins its next read
        self._reader_wake.set()

    def _read_forever(self) -> None:
        try:
            while True:
                if not self._waiters:
                    self._reader_wake.clear()
                    if not self._waiters:
                        self._reader_wake.wait(BLOCK_MS / 1000)
                    continue
                streams = {
                    key: f"{min(after for after, _ in waiting)}-0" for key, waiting in self._waiters.items()
                }
                self._reading = set(streams)
                try:
                    if self._reader_id is None:
                        # One connection, kept: CLIENT UNBLOCK names the connection that blocks.
                        self._reader_connection = self._reader_client.client()  # type: ignore[no-untyped-call]
                        self._reader_id = int(self._reader_connection.client_id())
                    found: Any = self._reader_connection.xread(streams, count=1, block=BLOCK_MS)
                except self._errors:
                    # Redis gone: wake every waiter so that its read reports it, then retry.
                    self._reader_id = None
                    if self._reader_connection is not None:
                        self._reader_connection.close()
                    self._wake(list(self._waiters))
                    _sleep(0.5)
                    continue
                finally:
                    self._reading = set()
                self._wake([key.decode() if isinstance(key, bytes) else key for key, _ in found or ()])
        finally:
            self._reader = None

    def _wake(self, keys: Sequence[str]) -> None:
        for key in keys:
            for _, event in self._waiters.pop(key, ()):
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
