"""A resumable run's generator, running on its own and appending its events to the run store.

Under gevent the generator runs in a greenlet of its own, in a copy of the starting request's
context (``request``, ``g`` and :func:`~flask_sse_run.current_token` work as in a stream), so
it outlives the connection that started it. It is driven the way
:class:`~flask_sse_run.gevent_stream.GeventStream` drives a stream: each item is encoded once,
with its id (``<run_id>:<seq>``), and appended to the store in batches (the first event at
once; then what the generator makes without blocking, up to ``BATCH_EVENTS`` or a fair slice;
held events go out the moment it blocks); a generator that never blocks gives the hub a turn
every ``FAIR_SLICE``.

It ends when the generator does (``complete``, or ``error`` with the error event), or when it is
cancelled (``DELETE``, the reconnect window, the worker shutting down): its token is cancelled
and :class:`~flask_sse_run.Interrupted` is thrown in where it waits, exactly as for a stream
whose client left. The events that end a stream (error, end or shutdown event) end the run's
buffer too, so a client that reconnects later reads them.

A store that does not answer (:class:`~.store.StoreUnavailable`) holds the generator where it
is: the producer keeps its events and tries again, and the run goes on when the store answers,
unless it stayed away longer than ``outage`` seconds; the run then ends as an ``error`` with a
``StoreUnavailable`` event, which the runtime stores once the store is back. A store that
refuses an append (the run was cancelled or lost elsewhere) stops the run with no more writes.

Without gevent (sync or thread workers, the test client) the generator runs in a daemon thread
and each event is appended as it is made; a cancel is seen at its next ``yield``.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

from .. import shutdown
from ..cancellation import TOKEN_VAR, CancelToken
from ..concurrency import gevent_patched, new_event, pause, spawn
from ..disconnect import Interrupted
from ..events import encode_with_id
from ..gevent_stream import FAIR_SLICE
from ..streaming import StreamOptions, close_stream_source, closing_events
from .endings import cancelled_event, store_unavailable_event
from .store import RunStore, StoreUnavailable

__all__ = ["BATCH_EVENTS", "Producer"]

#: Most events appended to the store at once.
BATCH_EVENTS = 256
#: Seconds between tries of a store that does not answer: the first, and the most.
RETRY_FIRST, RETRY_MOST = 0.1, 1.0
#: An unfinished end: ``(status, event)`` the store has yet to take.
Unfinished = tuple[str, bytes]

logger = logging.getLogger(__name__)


class Producer:
    """Runs one run's generator detached from any connection; see the module docstring.

    ``on_end(run_id, unfinished)`` is called once, when the run has ended: ``unfinished`` is
    ``None`` once its end is stored, else the ``(status, event)`` the store could not take yet.
    ``outage``: seconds a store that does not answer is waited for before the run ends.
    """

    def __init__(
        self,
        run_id: str,
        source: Iterator[Any],
        store: RunStore,
        options: StreamOptions,
        on_end: Callable[[str, Unfinished | None], None],
        outage: float = 10.0,
    ) -> None:
        self.run_id = run_id
        self.token = CancelToken()
        self._source = source
        self._store = store
        self._options = options
        self._on_end = on_end
        self._outage = outage
        self._batch: list[tuple[int, bytes]] = []
        # "cancelled", "shutdown", "store" (away too long) or "elsewhere" (ended by the store)
        self._ended_by: str | None = None
        self._in_generator = False
        self._ending = False  # its end is being stored: a cancel now changes nothing
        self._flushing = False
        self._scheduled = False
        self._flushed: Any = None
        self._greenlet: Any = None

    def start(self) -> None:
        """Start the generator on its own, in a copy of the current context."""
        context = contextvars.copy_context()
        run = self._run_gevent if gevent_patched() else self._run_thread
        self._greenlet = spawn(lambda: context.run(run))

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the run: its token is cancelled, the generator interrupted where it waits."""
        if self._ended_by is not None or self._ending:
            return
        self._ended_by = reason
        if gevent_patched() and self._in_generator:
            import gevent

            gevent.get_hub().loop.run_callback(self._interrupt)
        self.token.cancel(reason)

    def shutdown(self) -> None:
        """The worker is shutting down: end the run with the shutdown event."""
        self.cancel("shutdown")

    # -- under gevent ---------------------------------------------------------------------------

    def _run_gevent(self) -> None:
        import gevent  # patched: the import is a lookup

        loop = gevent.get_hub().loop
        shutdown.register(self)
        if shutdown.shutting_down():
            self._ended_by = "shutdown"
        source, id_prefix = self._source, f"{self.run_id}:".encode()
        # The producer's greenlet runs only the generator, in a context of its own: the token is
        # bound once for its whole life, not around every item as a stream's request greenlet
        # (which also runs other code) must.
        TOKEN_VAR.set(self.token)
        batch = self._batch  # _flush empties it in place: this name stays valid
        seq, error = 0, None
        try:
            turn, started = loop.iteration, perf_counter()
            while self._ended_by is None:
                if batch and not self._scheduled:
                    self._scheduled = True
                    loop.run_callback(self._hub_turn)
                before = loop.iteration
                self._in_generator = True
                try:
                    item = next(source)
                except (StopIteration, Interrupted):
                    break
                except Exception as exc:
                    error = exc
                    self._options.logger.error("run %s failed", self.run_id, exc_info=exc)
                    break
                finally:
                    self._in_generator = False
                seq += 1
                try:
                    data = encode_with_id(item, id_prefix, seq)
                except Exception as exc:  # an item that cannot be encoded ends the run
                    seq -= 1
                    error = exc
                    self._options.logger.error("run %s failed", self.run_id, exc_info=exc)
                    break
                if self._flushing:
                    self._wait_for_flush()
                batch.append((seq, data))
                now = loop.iteration
                if now != before or len(batch) >= BATCH_EVENTS or seq == 1:
                    self._flush()  # it blocked (it is slow), the batch is full, or the first event
                    now = loop.iteration
                if now != turn:
                    turn, started = now, perf_counter()
                elif perf_counter() - started >= FAIR_SLICE:
                    self._flush()
                    gevent.sleep(0)  # it never blocks: let the others run
                    turn, started = loop.iteration, perf_counter()
        finally:
            shutdown.unregister(self)
            if self._flushing:
                self._wait_for_flush()
            self._end(error)

    def _hub_turn(self) -> None:
        # The generator blocked while events were held: send them now, from a helper (an
        # append may wait on a network store, which the hub itself must never do).
        self._scheduled = False
        if self._in_generator and self._batch and not self._flushing:
            import gevent

            gevent.spawn_raw(self._helper_flush)

    def _helper_flush(self) -> None:
        if not self._in_generator or self._flushing or not self._batch:
            return
        self._flushing = True
        try:
            self._flush()
        finally:
            self._flushing = False
            if self._flushed is not None:
                self._flushed.set()

    def _wait_for_flush(self) -> None:
        if self._flushed is None:
            self._flushed = new_event()
        while self._flushing:
            self._flushed.clear()
            self._flushed.wait()

    def _interrupt(self) -> None:
        greenlet = self._greenlet
        if self._in_generator and greenlet is not None and not greenlet.dead:
            greenlet.throw(Interrupted(self._ended_by))

    # -- without gevent --------------------------------------------------------------------------

    def _run_thread(self) -> None:
        source, token, id_prefix = self._source, self.token, f"{self.run_id}:".encode()
        seq, error = 0, None
        try:
            while self._ended_by is None:
                bound = TOKEN_VAR.set(token)
                try:
                    item = next(source)
                except StopIteration:
                    break
                except Exception as exc:
                    error = exc
                    self._options.logger.error("run %s failed", self.run_id, exc_info=exc)
                    break
                finally:
                    TOKEN_VAR.reset(bound)
                if self._ended_by is not None:  # cancelled while it made this item: not sent
                    break
                seq += 1
                try:
                    self._batch.append((seq, encode_with_id(item, id_prefix, seq)))
                except Exception as exc:
                    seq -= 1
                    error = exc
                    self._options.logger.error("run %s failed", self.run_id, exc_info=exc)
                    break
                self._flush()
        finally:
            self._end(error)

    # -- both -----------------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._batch:
            return
        events = self._batch[:]
        self._batch.clear()  # in place: the loop holds this list
        down_since = None
        delay = RETRY_FIRST
        while True:
            try:
                taken = self._store.append(self.run_id, events)
                break
            except StoreUnavailable as exc:
                # Held, and tried again: a store back within the bound loses nothing.
                now = perf_counter()
                if down_since is None:
                    down_since = now
                    self._options.logger.warning(
                        "run %s: the store did not take its events (%s); trying again",
                        self.run_id,
                        exc.__cause__ or exc,
                    )
                if now - down_since >= self._outage or self._ended_by is not None:
                    self._stop("store")
                    return
                pause(min(delay, self._outage - (now - down_since)))
                delay = min(delay * 2, RETRY_MOST)
            except Exception as exc:  # a store that fails otherwise: the run cannot go on
                self._options.logger.error("run %s: the store did not take its events (%s)", self.run_id, exc)
                self._stop("store")
                return
        if not taken:  # cancelled or lost elsewhere: nothing more is written
            self._stop("elsewhere")

    def _stop(self, reason: str) -> None:
        if self._ended_by is None:
            self.cancel(reason)

    def _end(self, error: BaseException | None) -> None:
        ended_by = self._ended_by
        self._ending = ended_by is None  # ended by itself: what it says stands
        unfinished: Unfinished | None = None
        try:
            if ended_by != "elsewhere":
                if ended_by != "store":
                    self._flush()
                    ended_by = self._ended_by  # the flush may have found it ended
                unfinished = self._finish(ended_by, error)
        finally:
            close_stream_source(
                self._source,
                self.token,
                ended_by or "closed",
                early=ended_by is not None,
                options=self._options,
            )
            self._greenlet = None
            self._on_end(self.run_id, unfinished)

    def _finish(self, ended_by: str | None, error: BaseException | None) -> Unfinished | None:
        """Store the run's end; what the store could not take yet, for the runtime to retry."""
        if ended_by == "elsewhere":
            return None
        if ended_by == "store":
            status, event = "error", store_unavailable_event(self._outage)
        elif ended_by == "cancelled":
            status, event = "cancelled", cancelled_event("no client came back within the reconnect window")
        else:
            status = "error" if error is not None else ended_by or "complete"
            event = closing_events(self._options, error, shutdown=ended_by == "shutdown")
        try:
            self._store.finish(self.run_id, status, event)
        except Exception as exc:
            self._options.logger.error("run %s: the run store did not take its end (%s)", self.run_id, exc)
            return status, event
        return None
