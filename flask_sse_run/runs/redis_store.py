"""The Redis run store: runs shared by every worker and replica of an app (``SSE_RUN_REDIS_URL``).

Keys, under ``SSE_RUN_REDIS_PREFIX`` (default ``sse-run:``), so that several apps share one Redis.
A run's keys share the hash tag ``{<run_id>}``: its scripts touch one slot, so runs spread over
the nodes of a Redis Cluster.

* ``<prefix>run:{<run_id>}``: a hash, the run's state (``function``, ``prefix``, ``owner``,
  ``status``, ``last_seq``, ``clients``, ``idle_since``);
* ``<prefix>run:{<run_id>}:events``: a stream, one entry per batch of events the producer
  appends, with the entry id ``<last seq of the batch>-0`` and the fields ``s`` (its first seq),
  ``d`` (the encoded events, one after the other) and ``o`` (their lengths, 32-bit integers), so
  a position inside a batch is exact; the append's script keeps the last
  ``SSE_RUN_RESUME_MAX_EVENTS`` events and at most ``SSE_RUN_RESUME_MAX_BYTES`` bytes of them
  (whole batches go, oldest first; the newest batch is always kept), counting the bytes held in
  the hash's ``held`` field;
* ``<prefix>run:{<run_id>}:lease``: the producing worker's lease, ``LEASE_MS`` long, renewed by
  each append and, for a run that has not appended since, by its janitor's heartbeat;
* ``<prefix>run:{<run_id>}:changed``: the run's channel (sharded pub/sub, ``SPUBLISH``, on Redis
  7 and later); every append and the end publish on it.

Every key expires: while the run is produced, ``RUNNING_TTL`` seconds after the producer's last
append or heartbeat (so a worker killed mid-run does not leave them forever), then
``SSE_RUN_RESUME_TTL`` seconds after the end. No call ever makes a key without one: the scripts
that change a run's hash do nothing once it is gone.

Round trips: an append is one script call per batch of events (one ``XADD``, the hash's
``last_seq``, the expiries, the lease, the announcement), whatever the batch holds; a read is
two commands, and hands on each batch whole (a chunk), cut only where the position falls inside
it. Under gevent the appends and reads that a worker's runs make in one turn of its hub go to
Redis together, one pipelined round trip (:mod:`.batching`). An append's announcement carries
its batch (``<first seq> <last seq> <events>``): a follower that has read up to the batch
before takes it from there, and is then told "nothing new" once without a round trip, so that a
follower of a live run costs Redis nothing per event (see :meth:`RedisRunStore.read`).

Each worker has one pub/sub connection (:mod:`.redis_listener`), owned by a listener greenlet
(or thread): a run's channel is subscribed while a response of this worker follows it, and
unsubscribed when the last one leaves, so a worker hears only the runs it follows, however many
replicas share the Redis. A waiting response is woken by its run's announcement and reads again.

A Redis Cluster (``cluster=True``, ``SSE_RUN_REDIS_CLUSTER``): the URL names any node, redis-py's
cluster client learns the others and routes each call by its key's slot (a pipeline splits per
node). Runs spread over the primaries by their ids; a run's keys and channel share its slot,
so every script stays on one node. A worker has one listener per primary that owns a followed
run's slot (sharded pub/sub: a node delivers only its own slots' messages). A slot that moves
(a resharding) ends its sharded subscriptions: that listener connects again, the store learns
the slots again, and the moved runs are subscribed on their new node. Without sharded pub/sub
(Redis 6), ``PUBLISH`` reaches every node, and one listener on any node hears all.

How a run ends (every way leaves its reason as the run's last event, see :mod:`.endings`):

* its producer finishes it (one script: the closing event, the status, the TTL);
* ``DELETE`` anywhere ends it at once (the same script, with the cancel event); the producing
  worker's next append or heartbeat is refused, which stops its generator;
* its producer is lost: the worker's watchdog checks the lease of every followed run it heard
  nothing of for ``SILENCE`` seconds (in one round trip); gone twice, ``LOST_CONFIRM_MS`` apart
  by Redis's clock (a Redis that was paused comes back with every lease expired, and the
  producers renew theirs at once), the run ends as ``lost``.

Every call has a timeout; one that fails raises :class:`~.store.StoreUnavailable`. The producer
and the followers wait for a Redis that comes back within ``SSE_RUN_STORE_OUTAGE`` (see
:mod:`.producer` and :mod:`.tail`); redis-py reconnects, and the listener subscribes again to
every run followed here (waking their waiters to read again, so an announcement made while it
was away is not missed).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..channels.names import CHANNEL_PREFIX
from ..concurrency import new_event, new_lock, pause, spawn
from ..extras import missing_extra
from .batching import Batcher
from .endings import lost_event
from .redis_listener import Listener
from .store import LOST, RUNNING, RunInfo, RunSlice, RunStore, StoreFull, StoreUnavailable

_log = logging.getLogger("flask_sse_run.runs")

__all__ = ["LEASE_MS", "POOL_SIZE", "RUNNING_TTL", "SILENCE", "TIMEOUT", "RedisRunStore"]

#: Seconds every Redis call may take (connect, read or write) before the store is unavailable.
TIMEOUT = 2.0
#: Connections each worker's calls share (not the listener's own); a call waits for a free one.
POOL_SIZE = 50
#: Seconds a running run's keys live past the producer's last append or heartbeat.
RUNNING_TTL = 120
#: How long a producer's lease lasts (ms); its janitor renews it every half second.
LEASE_MS = 2000
#: A lease found gone is checked again this much later (ms, by Redis's clock) before the run is
#: declared lost.
LOST_CONFIRM_MS = 1000
#: Seconds of silence after which the worker checks that a followed run's producer is still
#: there; the watchdog looks this often, and checks a silent run again this often.
SILENCE = 1.5
WATCH_EVERY = 0.5
#: Seconds a wait on a run whose channel is not subscribed (yet) lasts before it reads again.
UNSUBSCRIBED_POLL = 0.5
#: Seconds between two log lines that say why Redis is unavailable.
LOG_EVERY = 10.0
#: Lengths of a batch's events: 32-bit unsigned integers, as the ``o`` field keeps them.
_LENGTHS = "I"

# KEYS: the hash, the lease. ARGV: running TTL, lease ms, worker, then the hash's fields.
_CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return 1
"""
# KEYS: the hash, the stream, the lease. ARGV: min id kept, TTL, last seq, first seq, the
# events' bytes, their lengths, the channel, the publish command, the worker, the lease ms, the
# most bytes held (0: no bound). An append renews the lease: a producer that appends needs no
# heartbeat to stay alive. Its announcement carries the batch ("<first seq> <last seq>
# <events>"): a follower that has read up to it takes the events from there, without a read.
# The run's hash keeps the bytes its stream holds (``held``), and the id and bytes of its oldest
# batch (``head``, ``head_bytes``), so an append within both bounds reads nothing; past one, the
# oldest batches go (exactly: a batch whose events are all beyond the event bound, then while the
# bytes are over), the newest always kept, each read once to learn the next one's bytes.
_APPEND = """
local state = redis.call('HMGET', KEYS[1], 'status', 'held', 'head', 'head_bytes', 'last_seq')
if state[1] ~= 'running' then
  return 0
end
redis.call('SET', KEYS[3], ARGV[9], 'PX', ARGV[10])
if tonumber(state[5] or '0') >= tonumber(ARGV[3]) then
  -- Taken already: the producer gave up waiting for a Redis that was stalled, and sent it
  -- again, while Redis, once it went on, ran the first one.
  return 1
end
redis.call('XADD', KEYS[2], ARGV[3] .. '-0', 's', ARGV[4], 'd', ARGV[5], 'o', ARGV[6])
local last, minid, most = tonumber(ARGV[3]), tonumber(ARGV[1]), tonumber(ARGV[11])
local held = tonumber(state[2] or '0') + #ARGV[5]
local head, size = tonumber(state[3] or ARGV[3]), tonumber(state[4] or #ARGV[5])
if head ~= last and (head < minid or (most > 0 and held > most)) then
  local gone = nil
  repeat
    held, gone = held - size, head
    -- The next entry only: one can be a whole batch, and most appends drop one.
    local entry = redis.call('XRANGE', KEYS[2], '(' .. head .. '-0', '+', 'COUNT', 1)[1]
    head, size = tonumber(string.match(entry[1], '^%d+')), 0
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'd' then
        size = #fields[i + 1]
      end
    end
  until head == last or (head >= minid and (most == 0 or held <= most))
  redis.call('XTRIM', KEYS[2], 'MINID', (gone + 1) .. '-0')
end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[3], 'held', held, 'head', head, 'head_bytes', size)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call(ARGV[8], ARGV[7], ARGV[4] .. ' ' .. ARGV[3] .. ' ' .. ARGV[5])
return 1
"""
# Ends a running run. KEYS: the hash, the stream, the lease. ARGV: mode ('end', or 'lost': only
# if the lease is gone, twice, LOST_CONFIRM_MS apart), status, TTL ms, the last event (without
# its id line; '' for none), the run id, the channel, the publish command, the confirm ms.
# Returns -1 (no such run), 0 (not running, or alive), 1 (ended now), 2 (lease gone: suspect).
_END = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return -1
end
if status ~= 'running' then
  return 0
end
if ARGV[1] == 'lost' then
  if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('HGET', KEYS[1], 'kind') == 'channel' then
    return 0
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local suspect = tonumber(redis.call('HGET', KEYS[1], 'suspect'))
  if not suspect then
    redis.call('HSET', KEYS[1], 'suspect', now)
    return 2
  end
  if now - suspect < tonumber(ARGV[8]) then
    return 2
  end
end
if ARGV[4] ~= '' then
  local seq = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0') + 1
  local data = 'id: ' .. ARGV[5] .. ':' .. seq .. '\\n' .. ARGV[4]
  redis.call('XADD', KEYS[2], seq .. '-0', 's', seq, 'd', data, 'o', struct.pack('<I4', #data))
  redis.call('HSET', KEYS[1], 'last_seq', seq)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
redis.call('HDEL', KEYS[1], 'suspect')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
redis.call(ARGV[7], ARGV[6], '')
return 1
"""
# The producer's heartbeat. KEYS: the hash, the stream, the lease. ARGV: worker, lease ms,
# running TTL, then the fields to return. Returns the run's state (empty: gone); a running one's
# lease and keys are renewed.
_HEARTBEAT = """
local f = redis.call('HMGET', KEYS[1], unpack(ARGV, 4))
if not f[1] then
  return {}
end
if f[1] == 'running' then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  redis.call('HDEL', KEYS[1], 'suspect')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return f
"""
_DETACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
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
# A channel: a run with no producer (no lease; the lost check passes it by), made by its first
# publish or open, with its birth (Redis's clock, us): a channel made again (its keys expired, or
# a Redis that lost its data) starts its seqs over, and its followers must tell it from the old
# one even when the new seqs have passed theirs. KEYS: the hash, the stream. ARGV: its TTL, the
# hash's fields.
_OPEN_CHANNEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'born', t[1] .. t[2], unpack(ARGV, 2))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return tonumber(redis.call('HGET', KEYS[1], 'last_seq'))
"""
# Publishes on a channel: the seq is the channel's (publishers are many), the stream keeps the
# last ARGV[3] events exactly. Its announcement is a run's, after 'c<birth> '. KEYS: the hash,
# the stream. ARGV: the id line's start, the event, the history, the TTL, the announcement's
# channel, the publish command, the hash's fields.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'born', t[1] .. t[2], unpack(ARGV, 7))
end
local born = redis.call('HGET', KEYS[1], 'born')
local seq = redis.call('HINCRBY', KEYS[1], 'last_seq', 1)
local data = 'id: ' .. ARGV[1] .. seq .. '\\n' .. ARGV[2]
local lengths = struct.pack('<I4', #data)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], seq .. '-0', 's', seq, 'd', data, 'o', lengths)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[6], ARGV[5], 'c' .. born .. ' ' .. seq .. ' ' .. seq .. ' ' .. data)
return seq
"""
_FIELDS = ("status", "function", "prefix", "owner", "last_seq", "clients", "idle_since")


class RedisRunStore(RunStore):
    """Runs in Redis; see the module docstring. ``url`` is a ``redis://``, ``rediss://`` or
    ``unix://`` URL."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        max_events: int,
        max_runs: int,
        ttl: float,
        window: float,
        cluster: bool = False,
        max_bytes: int | None = None,
        channel_history: int = 1000,
        channel_ttl: float = 600.0,
    ) -> None:
        try:
            import redis
        except ImportError as error:
            raise missing_extra("redis", error) from error

        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            redis.exceptions.RedisClusterException,  # not a RedisError: no node answers, say
            OSError,
        )
        # ValueError and AttributeError too: redis-py's reading a socket that close() closed
        # (its buffer gone) from another thread.
        self._listen_errors: tuple[type[BaseException], ...] = (*self._errors, ValueError, AttributeError)
        # Nothing connects here: a Redis that is down at start-up makes requests 503, not the
        # app fail to start, and serves again once it is back.
        # A pool that makes a call wait (up to TIMEOUT) for a free connection: redis-py's
        # default pool raises "Too many connections" past 100, and a thousand runs starting at
        # once got 503s. A ``max_connections`` in the URL's query overrides the size.
        timeouts = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT, "retry_on_timeout": False}
        self._cluster = cluster
        self._client: Any = None
        self._reader_client: Any = None
        self._connecting: Any = None  # a lock around making the cluster client; made at first use
        if cluster:
            # redis-py's cluster client asks the URL's node for the others and their slots as
            # it is made: made at the first call instead (see _redis). Each node gets a
            # blocking pool of its own, and a call follows a MOVED reply (a resharding) once.
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._make_cluster: Callable[[], Any] = lambda: redis.RedisCluster.from_url(
                url,
                connection_pool_class=redis.BlockingConnectionPool,
                max_connections=POOL_SIZE,
                timeout=TIMEOUT,
                retry=Retry(NoBackoff(), 1),
                **timeouts,
            )
        else:
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=POOL_SIZE, timeout=TIMEOUT, **timeouts
            )
            self._client = redis.Redis(connection_pool=pool)
            # The listener's connection, apart from the pool that calls wait on.
            self._reader_client = redis.Redis.from_url(url, **timeouts)
        self.prefix = prefix
        self.max_events = max_events
        #: Most bytes of events a run's stream holds (``None``: only ``max_events`` bounds it).
        self.max_bytes = max_bytes
        self.max_runs = max_runs
        self.ttl = ttl
        self.channel_history = channel_history
        self.channel_ttl = channel_ttl
        self._running_ttl = max(RUNNING_TTL, int(window * 2) + 10)
        # The scripts' SHA1s: every call is an EVALSHA through the batcher, which loads a
        # script where Redis (or a cluster node) does not have it.
        sources = (_CREATE, _APPEND, _END, _HEARTBEAT, _DETACH, _ATTACH, _OPEN_CHANNEL, _PUBLISH)
        shas = [hashlib.sha1(source.encode()).hexdigest() for source in sources]
        self._create, self._append, self._end, self._heartbeat, self._detach, self._attach = shas[:6]
        self._open_channel, self._publish_channel = shas[6:]
        self._worker_id = (0, "")
        self._beat = False
        self._sharded: bool | None = None  # SPUBLISH and SSUBSCRIBE (Redis 7+): asked once
        self._batcher = Batcher(
            lambda: self._redis, dict(zip(shas, sources, strict=True)), redis.exceptions.NoScriptError
        )
        self._local: set[str] = set()  # runs produced by this process, still running
        # Channels opened here: the watchdog never checks them (no producer to lose).
        self._channel_runs: set[str] = set()
        # When each run produced here last appended (monotonic): its lease is fresh till then.
        self._appended: dict[str, float] = {}
        self._waiters: dict[str, list[Any]] = {}  # run id -> events of the greenlets waiting
        # Runs this process's responses follow: how many clients, and how many announcements
        # the listener heard for each (a read's mark; see wait). Values from one increasing
        # count, so that an entry made again never equals an old mark.
        self._followers: dict[str, int] = {}
        self._heard: dict[str, int] = {}
        # The last batch announced of each followed run, (first seq, last seq, events), as of
        # its count in _heard: the next read of a follower at its start needs no round trip.
        self._fresh: dict[str, tuple[int, int, bytes, str | None]] = {}
        self._announcements = itertools.count(1)
        # When each followed run was last heard of (monotonic): the watchdog checks silent ones.
        self._last_heard: dict[str, float] = {}
        # The pub/sub connections (one, or one per cluster node that owns a followed run's
        # slot, by node name) and the one that carries each followed run's channel.
        self._listeners: dict[str, Listener] = {}
        self._routes: dict[str, Listener] = {}
        self._connections = itertools.count(1)
        # Held only around these dicts (no I/O under it): the listener may be a thread.
        self._lock = threading.Lock()
        self._watching = False
        self._closed = False
        self._reported = -LOG_EVERY

    # -- keys and errors -------------------------------------------------------------------------

    def _key(self, run_id: str) -> str:
        return f"{self.prefix}run:{{{run_id}}}"

    def _keys(self, run_id: str) -> list[str]:
        """The hash, the stream and the lease of a run."""
        key = self._key(run_id)
        return [key, f"{key}:events", f"{key}:lease"]

    def _channel(self, run_id: str) -> str:
        return f"{self._key(run_id)}:changed"

    def _run_of(self, channel: bytes) -> str:
        # "<prefix>run:{<run_id>}:changed"
        start = len(self.prefix) + 5
        return channel.decode()[start : start + 32]

    def _eval(self, sha: str, keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
        """One script's reply (an error reply raised); call it within :meth:`_call`."""
        (reply,) = self._batcher.run([("EVALSHA", sha, len(keys), *keys, *args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    @contextmanager
    def _call(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            self._report(exc)
            raise StoreUnavailable() from exc

    def _report(self, exc: BaseException) -> None:
        # Clients get "unavailable, try again"; the log says why, once per LOG_EVERY seconds (an
        # outage fails every call).
        now = time.monotonic()
        if now - self._reported >= LOG_EVERY:
            self._reported = now
            _log.warning("the Redis run store is unavailable: %s: %s", type(exc).__name__, exc)

    def _publish(self) -> str:
        """``SPUBLISH`` where the server has sharded pub/sub (Redis 7+), else ``PUBLISH``."""
        if self._sharded is None:
            with self._call():
                version = str(self._redis.info("server").get("redis_version", "0"))
            self._sharded = int(version.split(".")[0]) >= 7
        return "SPUBLISH" if self._sharded else "PUBLISH"

    @property
    def _redis(self) -> Any:
        """The client (a cluster's made at the first call: StoreUnavailable if none answers)."""
        if self._client is None:
            if self._connecting is None:
                self._connecting = new_lock()
            with self._connecting, self._call():
                if self._client is None and not self._closed:
                    self._client = self._make_cluster()
            if self._client is None:
                raise StoreUnavailable()
        return self._client

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _worker(self) -> str:
        # Who holds a lease: this host and process (made again after a fork).
        if self._worker_id[0] != os.getpid():
            self._worker_id = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}")
        return self._worker_id[1]

    # -- the producer's side ---------------------------------------------------------------------

    def create(self, run_id: str, function: str, prefix: str, owner: str | None) -> None:
        """Record a new run and its lease; :class:`StoreFull` when this process produces
        ``max_runs``."""
        if len(self._local) >= self.max_runs:
            raise StoreFull(self.max_runs, retry_after=5)
        fields: list[str | int] = [
            "function", function, "prefix", prefix, "owner", owner or "", "status", RUNNING,
            "last_seq", 0, "clients", 0, "idle_since", repr(time.time()),
        ]  # fmt: skip
        hash_key, _, lease = self._keys(run_id)
        with self._call():
            self._eval(
                self._create, [hash_key, lease], [self._running_ttl, LEASE_MS, self._worker(), *fields]
            )
        self._local.add(run_id)

    def append(self, run_id: str, events: Sequence[tuple[int, bytes]]) -> bool:
        """One round trip, one stream entry for the whole batch (a script, so nothing is added
        to a run that ended): the events, the run's ``last_seq``, the keys' expiry."""
        first, last = events[0][0], events[-1][0]
        lengths = array(_LENGTHS, [len(data) for _, data in events])
        keys = self._keys(run_id)
        args: list[int | bytes | str] = [
            max(1, last - self.max_events + 1),  # MINID: what falls out of the bound
            self._running_ttl,
            last,
            first,
            b"".join([data for _, data in events]),
            lengths.tobytes(),
            self._channel(run_id),
            self._publish(),
            self._worker(),
            LEASE_MS,
            self.max_bytes or 0,
        ]
        with self._call():
            (reply,) = self._batcher.run([("EVALSHA", self._append, 3, *keys, *args)])
        self._appended[run_id] = time.monotonic()
        if isinstance(reply, Exception):
            raise reply
        taken = bool(reply)
        if not taken:
            self._local.discard(run_id)
        return taken

    def finish(self, run_id: str, status: str, event: bytes = b"") -> bool:
        """End the run with ``event`` last, tell its readers, and start the TTL."""
        ended = self._end_run(run_id, "end", status, event) == 1
        self._local.discard(run_id)
        return ended

    def cancel(self, run_id: str, event: bytes) -> bool:
        """End the run as cancelled, ``event`` last, for every follower at once; its producer
        (wherever it is) is refused its next append or heartbeat."""
        return self._end_run(run_id, "end", "cancelled", event) != -1

    def _end_run(self, run_id: str, mode: str, status: str, event: bytes) -> int:
        ttl_ms = max(1, int(self.ttl * 1000))
        args: list[str | int | bytes] = [
            mode,
            status,
            ttl_ms,
            event,
            run_id,
            self._channel(run_id),
            self._publish(),
            LOST_CONFIRM_MS,
        ]
        with self._call():
            return int(self._eval(self._end, self._keys(run_id), args))

    def heartbeat(self, run_ids: Sequence[str]) -> dict[str, RunInfo | None]:
        """Renew the leases and keys of these running runs (produced here), in one round trip,
        and return their states: what the janitor needs, read in the same call. Every other
        call skips the runs that appended since the last (an append renews the lease)."""
        now = time.monotonic()
        # A run that appended within the last beat renewed its lease then: only the window
        # needs its state, and every other beat is enough for that.
        self._beat = not self._beat
        due = [r for r in run_ids if self._beat or now - self._appended.get(r, 0.0) >= LEASE_MS / 2000]
        return dict(zip(due, self._beat_runs(due), strict=True))

    def _beat_runs(self, run_ids: Sequence[str]) -> list[RunInfo | None]:
        if not run_ids:
            return []
        args: list[str | int] = [self._worker(), LEASE_MS, self._running_ttl, *_FIELDS]
        with self._call():
            replies = self._batcher.run(
                [("EVALSHA", self._heartbeat, 3, *self._keys(run_id), *args) for run_id in run_ids]
            )
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable() from reply
        infos = [_info(run_id, reply) for run_id, reply in zip(run_ids, replies, strict=True)]
        for run_id, info in zip(run_ids, infos, strict=True):
            if info is None or not info.running:
                self._local.discard(run_id)
                self._appended.pop(run_id, None)
        return infos

    # -- channels ---------------------------------------------------------------------------------

    def _channel_fields(self) -> list[str | int]:
        return [
            "function", "", "prefix", CHANNEL_PREFIX, "owner", "", "status", RUNNING,
            "last_seq", 0, "clients", 0, "kind", "channel",
        ]  # fmt: skip

    def open_channel(self, run_id: str) -> int:
        """One round trip: the channel made if need be, its keys' TTL renewed, its last seq."""
        self._channel_runs.add(run_id)
        hash_key, events_key, _ = self._keys(run_id)
        with self._call():
            return int(
                self._eval(
                    self._open_channel,
                    [hash_key, events_key],
                    [max(1, round(self.channel_ttl)), *self._channel_fields()],
                )
            )

    def publish(self, run_id: str, id_prefix: bytes, event: bytes) -> int:
        """One round trip (a script): the seq, the event, the history's bound, the TTL, and the
        announcement that carries the event to every worker that follows the channel."""
        hash_key, events_key, _ = self._keys(run_id)
        args: list[str | int | bytes] = [
            id_prefix,
            event,
            self.channel_history,
            max(1, round(self.channel_ttl)),
            self._channel(run_id),
            self._publish(),
            *self._channel_fields(),
        ]
        with self._call():
            return int(self._eval(self._publish_channel, [hash_key, events_key], args))

    # -- the readers' side -----------------------------------------------------------------------

    def get(self, run_id: str) -> RunInfo | None:
        """The run's state, or ``None``."""
        return self.get_many([run_id])[0]

    def get_many(self, run_ids: Sequence[str]) -> list[RunInfo | None]:
        """The states of several runs in one round trip."""
        with self._call():
            pipe = self._redis.pipeline(transaction=False)
            for run_id in run_ids:
                pipe.hmget(self._key(run_id), *_FIELDS)
            found: list[list[bytes | None]] = pipe.execute()
        return [_info(run_id, fields) for run_id, fields in zip(run_ids, found, strict=True)]

    def read(self, run_id: str, after: int, limit: int) -> RunSlice | None:
        """One round trip: the state and up to ``limit`` batches holding events after ``after``;
        none where the position is at the start or the end of the last batch this worker heard
        announced."""
        with self._lock:
            mark = self._mark(run_id)  # before the round trip: a change made during it counts
            fresh = self._fresh.get(run_id)
            if fresh is not None and mark is not None:
                # The state as of the last announcement heard (the mark is its count): running,
                # up to the batch's last seq. After the position come the batch's events, or
                # none (read already). A change since moves the mark, and the caller reads again.
                first, last, data, born = fresh
                if after == first - 1:
                    return RunSlice([(last, data)], 0, RUNNING, last, mark, born)
                if after == last:
                    # Once: a follower that waits past its timeout with nothing heard asks Redis
                    # again (a stalled Redis says nothing, and must still be noticed).
                    del self._fresh[run_id]
                    return RunSlice([], 0, RUNNING, last, mark, born)
        hash_key, events_key, _ = self._keys(run_id)
        with self._call():
            state, entries = self._batcher.run(
                [
                    ("HMGET", hash_key, "status", "last_seq", "born"),
                    ("XRANGE", events_key, f"{after + 1}-0", "+", "COUNT", limit),
                ]
            )
        for reply in (state, entries):
            if isinstance(reply, Exception):
                raise reply
        status, last_seq, born = state
        if status is None:
            return None
        batches = [dict(zip(fields[::2], fields[1::2], strict=True)) for _, fields in entries]
        events = [_chunk(fields, after) for fields in batches]
        # The first batch after the position starts later than the next seq: the ones between
        # were trimmed away.
        missed = max(0, int(batches[0][b"s"]) - 1 - after) if batches else 0
        return RunSlice(events, missed, status.decode(), int(last_seq or 0), mark, born and born.decode())

    def _mark(self, run_id: str) -> tuple[int, int] | None:
        # What the listener has heard of the run, if its channel is subscribed now (under the
        # lock).
        listener = self._routes.get(run_id)
        if listener is None or run_id not in listener.subscribed:
            return None
        return (listener.connection, self._heard[run_id])

    def wait(self, run_id: str, after: int, timeout: float, mark: object = None) -> None:
        """Wait for the run to change, through this worker's subscription to its channel.

        Each round registers, then makes sure no change slipped in since the caller's read
        began: with that read's ``mark``, by what the listener has heard since (the same
        connection and count of announcements: no round trip, since every change is announced
        after it is stored); without one (not subscribed yet), by asking Redis (one ``HMGET``).
        A run that falls silent is the watchdog's (see :meth:`_watch`): a lost one is ended, and
        its waiters woken.
        """
        deadline = time.monotonic() + timeout
        while True:
            event = new_event()
            with self._lock:
                self._waiters.setdefault(run_id, []).append(event)
            try:
                self._ensure_listening(run_id)
                if mark is not None:
                    with self._lock:
                        now = self._mark(run_id)
                    if mark != now:
                        return  # heard of a change since the read began: read again
                else:
                    with self._call():
                        status, last_seq = self._redis.hmget(self._key(run_id), "status", "last_seq")
                    if status is None or status != b"running" or int(last_seq or 0) > after:
                        return
                left = deadline - time.monotonic()
                if left <= 0 or mark is not None:
                    if left > 0:
                        event.wait(left)
                    return
                # Not subscribed to the run (yet): nothing may wake it, so it asks again soon.
                if event.wait(min(left, UNSUBSCRIBED_POLL)):
                    return
            finally:
                self._unwait(run_id, event)

    def _unwait(self, run_id: str, event: Any) -> None:
        with self._lock:
            waiting = self._waiters.get(run_id)
            if waiting is not None:
                if event in waiting:
                    waiting.remove(event)
                if not waiting:
                    del self._waiters[run_id]

    def attach(self, run_id: str) -> None:
        """A client follows the run (in any worker); the first here subscribes to its channel."""
        with self._call():
            self._eval(self._attach, [self._key(run_id)], [])
        with self._lock:
            followers = self._followers.get(run_id, 0)
            self._followers[run_id] = followers + 1
            if followers == 0:
                self._heard[run_id] = next(self._announcements)
                self._last_heard[run_id] = time.monotonic()
        if followers == 0:
            listener = self._listener_for(run_id)
            with self._lock:
                self._routes[run_id] = listener
            self._ensure_listening(run_id)
            listener.send("subscribe", run_id)

    def detach(self, run_id: str) -> None:
        """A client left; the last one here unsubscribes, the last anywhere marks the run idle
        (its window starts). A run that is gone stays gone."""
        listener = None
        with self._lock:
            left = self._followers.get(run_id, 1) - 1
            if left > 0:
                self._followers[run_id] = left
            else:
                self._followers.pop(run_id, None)
                self._heard.pop(run_id, None)
                self._fresh.pop(run_id, None)
                self._last_heard.pop(run_id, None)
                self._channel_runs.discard(run_id)
                listener = self._routes.pop(run_id, None)
                if listener is not None:
                    listener.subscribed.discard(run_id)
        if left <= 0 and listener is not None:
            listener.send("unsubscribe", run_id)
        with self._call():
            self._eval(self._detach, [self._key(run_id)], [repr(time.time())])

    def close(self) -> None:
        """Close the connections (the listener stops at its next wake-up)."""
        self._closed = True
        if self._client is not None:
            self._client.close()
        if self._reader_client is not None:
            self._client.connection_pool.disconnect()  # a pool passed in is not closed with its client
            self._reader_client.close()

    # -- the listener ---------------------------------------------------------------------------

    def _listener_for(self, run_id: str) -> Listener:
        # A standalone Redis (or a cluster without sharded pub/sub, where PUBLISH reaches every
        # node): one listener. A cluster with it: the listener of the node owning the slot.
        sharded = self._publish() == "SPUBLISH"
        name, client = "", self._reader_client
        if self._cluster:
            try:
                node = (
                    self._redis.get_node_from_key(self._channel(run_id))
                    if sharded
                    else self._redis.get_default_node()
                )
            except self._errors as exc:
                raise StoreUnavailable() from exc
            if sharded:
                name = node.name
            client = self._redis.get_redis_connection(node)
        with self._lock:
            listener = self._listeners.get(name)
            if listener is None:
                listener = self._listeners[name] = Listener(
                    self,
                    client,
                    lock=self._lock,
                    sharded=sharded,
                    channel=self._channel,
                    run_of=self._run_of,
                    connections=self._connections,
                    errors=self._listen_errors,
                )
        return listener

    def _ensure_listening(self, run_id: str) -> None:
        # Started again if it ended (by an error it does not expect), so waits never rely on a
        # listener or a watchdog that is gone.
        listener = self._routes.get(run_id)
        if listener is not None:
            listener.start()
        if not self._watching and not self._closed:
            self._watching = True
            spawn(self._watch)

    # What the listeners ask of their store (.redis_listener.Owner).

    def followed_on(self, listener: Listener) -> list[str]:
        """The runs followed here whose channel ``listener`` carries (under the lock)."""
        return [run_id for run_id, route in self._routes.items() if route is listener]

    def heard(self, run_id: str, message: bytes) -> None:
        """An announcement of the run: a change for the marks, and its waiters read again. An
        append's carries its batch, kept for the next read; an end's is empty."""
        fresh = None
        if message:
            born = None
            if message[:1] == b"c":  # a channel's: its birth first
                tag, message = message.split(b" ", 1)
                born = tag[1:].decode()
            first, last, data = message.split(b" ", 2)
            fresh = (int(first), int(last), data, born)
        with self._lock:
            if run_id in self._heard:  # followed here
                self._heard[run_id] = next(self._announcements)
                self._last_heard[run_id] = time.monotonic()
                if fresh is None:
                    self._fresh.pop(run_id, None)
                else:
                    self._fresh[run_id] = fresh
        self._wake([run_id])

    def confirmed(self, listener: Listener, run_id: str) -> None:
        """The run's channel is subscribed: a change announced before went unheard, so its
        waiters read again."""
        with self._lock:
            if self._routes.get(run_id) is not listener:
                return  # no longer followed, or followed through another node now
            listener.subscribed.add(run_id)
        self._wake([run_id])

    def broke(self, listener: Listener, error: BaseException | None) -> None:
        """What was heard through ``listener`` counts no more: every waiter reads again. In a
        cluster, the slots are learnt again, and a followed run whose slot moved to another
        node is subscribed there."""
        with self._lock:
            for run_id in self.followed_on(listener):
                self._fresh.pop(run_id, None)
        if self._cluster and error is not None and not self._closed:
            self._route_again(listener)
        self._wake(list(self._waiters))

    def _route_again(self, listener: Listener) -> None:
        try:
            self._redis.nodes_manager.initialize()
        except self._errors:
            return  # the cluster is away: the listener tries again, and so does this
        with self._lock:
            runs = self.followed_on(listener)
        for run_id in runs:
            try:
                moved = self._listener_for(run_id)
            except StoreUnavailable:
                return
            with self._lock:
                if self._routes.get(run_id) is not listener or moved is listener:
                    continue
                self._routes[run_id] = moved
            moved.start()
            moved.send("subscribe", run_id)

    def _watch(self) -> None:
        # One greenlet per worker: the followed runs silent for SILENCE seconds have their
        # producer's lease checked, together (a run with news is never checked).
        try:
            while not self._closed and self._followers:
                pause(WATCH_EVERY)
                now = time.monotonic()
                with self._lock:
                    silent = [
                        run_id
                        for run_id, heard in self._last_heard.items()
                        if now - heard >= SILENCE and run_id not in self._channel_runs
                    ]
                    for run_id in silent:  # checked again a second later, not at every look
                        self._last_heard[run_id] = now - SILENCE + 1.0
                if silent:
                    try:
                        self._check_lost(silent)
                    except self._errors:
                        pass  # Redis away: the followers' own calls report it
        finally:
            self._watching = False

    def _check_lost(self, run_ids: Sequence[str]) -> None:
        ttl_ms, publish, event = max(1, int(self.ttl * 1000)), self._publish(), lost_event()
        commands = [
            ("EVALSHA", self._end, 3, *self._keys(run_id),
             "lost", LOST, ttl_ms, event, run_id, self._channel(run_id), publish, LOST_CONFIRM_MS)
            for run_id in run_ids
        ]  # fmt: skip
        replies = self._batcher.run(commands)
        self._wake([run_id for run_id, reply in zip(run_ids, replies, strict=True) if reply in (-1, 1)])

    def _wake(self, run_ids: Sequence[str]) -> None:
        with self._lock:
            events = [event for run_id in run_ids for event in self._waiters.pop(run_id, ())]
        for event in events:
            event.set()


def _info(run_id: str, values: Sequence[bytes | None]) -> RunInfo | None:
    """The run's state from the values of ``_FIELDS`` (none, or no status: gone)."""
    if not values or values[0] is None:
        return None
    text = {key: value.decode() for key, value in zip(_FIELDS, values, strict=True) if value is not None}
    return RunInfo(
        run_id=run_id,
        function=text.get("function", ""),
        prefix=text.get("prefix", ""),
        owner=text.get("owner") or None,
        status=text.get("status", RUNNING),
        last_seq=int(text.get("last_seq", 0)),
        clients=int(text.get("clients", 0)),
        idle_since=float(text["idle_since"]) if text.get("idle_since") else None,
    )


def _chunk(fields: dict[bytes, bytes], after: int) -> tuple[int, bytes]:
    """``(last seq, bytes)`` of the events of one stream entry (a batch) above ``after``."""
    lengths = array(_LENGTHS)
    lengths.frombytes(fields[b"o"])
    first, data = int(fields[b"s"]), fields[b"d"]
    last = first + len(lengths) - 1
    if first > after:
        return last, data
    return last, data[sum(lengths[: after - first + 1]) :]  # the position falls inside it
