"""Resumable runs: a generator that runs detached from its connection, its events kept in a store.

Public surface: the store interface (:class:`RunStore`, :class:`RunInfo`, :class:`RunSlice`, the
``RUNNING``/``LOST``/``ENDED`` statuses, and the :class:`StoreFull` and :class:`StoreUnavailable` errors a
store raises) and its two implementations, :class:`MemoryRunStore` (one process, the default) and
:class:`RedisRunStore` (every worker and replica; its module imports redis-py only when a store is
made, so this package imports without the ``redis`` extra; a standalone Redis or a Redis
Cluster). An app chooses one with ``SSE_RUN_REDIS_URL`` (and ``SSE_RUN_REDIS_CLUSTER``);
``@sse.function(resumable=True)`` is how a function becomes a run.

The other modules are the extension's own: :mod:`.runtime` (a worker's runs and its janitor),
:mod:`.producer` (the greenlet that drives a run's generator), :mod:`.responses` (the HTTP
side: start, reconnect, ``DELETE``), :mod:`.tail` (a response that follows a run),
:mod:`.endings` (the events that say why a run ended early), :mod:`.batching` (a hub turn's
Redis calls in one round trip), :mod:`.redis_listener` (a worker's pub/sub connection to Redis,
or to one cluster node) and :mod:`.ids` (run and event ids).
"""

from __future__ import annotations

from .memory import MemoryRunStore
from .redis_store import RedisRunStore
from .store import ENDED, LOST, RUNNING, RunInfo, RunSlice, RunStore, StoreFull, StoreUnavailable

__all__ = [
    "ENDED",
    "LOST",
    "RUNNING",
    "MemoryRunStore",
    "RedisRunStore",
    "RunInfo",
    "RunSlice",
    "RunStore",
    "StoreFull",
    "StoreUnavailable",
]
