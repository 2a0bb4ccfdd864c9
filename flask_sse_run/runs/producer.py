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
from ..concurrency import gevent_patched, new_event, spawn
from ..disconnect import Interrupted
from ..events import encode_with_id
from ..gevent_stream import FAIR_SLICE
from ..streaming import StreamOptions, close_stream_source, closing_events
from .ids import event_id
from .store import RunStore

__all__ = ["BATCH_EVENTS", "Producer"]

#: Most events appended to the store at once.
BATCH_EVENTS = 256

logger = logging.getLogger(__name__)


class Producer:
    """Runs one run's generator detached from any connection; see the module docstring.

    ``on_end(run_id)`` is called once, when the run has ended and its status is stored.
    """

    def __init__(
        self,
        run_id: str,
        source: Iterator[Any],
        store: RunStore,
        options: StreamOptions,
        on_end: Callable[[str], None],
    ) -> None:
        self.run_id = run_id
        self.token = CancelToken()
        self._source = source
        self._store = store
        self._options = options
        self._on_end = on_end
        self._batch: list[tuple[int, bytes]] = []
        self._ended_by: str | None = None  # "cancelled", "shutdown" or "store" (append failed)
        self._in_generator = False
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
        if self._ended_by is not None:
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
            self._end(seq, error)

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
            self._end(seq, error)

    # -- both -----------------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._batch:
            return
        events = self._batch[:]
        self._batch.clear()  # in place: the loop holds this list
        try:
            self._store.append(self.run_id, events)
        except Exception as exc:  # the store went away: the run cannot go on
            if self._ended_by is None:
                self._options.logger.error("run %s: the store did not take its events (%s)", self.run_id, exc)
                self._ended_by = "store"
                self.token.cancel("store")

    def _end(self, seq: int, error: BaseException | None) -> None:
        ended_by = self._ended_by
        status = "error" if error is not None or ended_by == "store" else ended_by or "complete"
        try:
            if ended_by != "store":
                tail = closing_events(self._options, error, shutdown=ended_by == "shutdown")
                if tail:
                    seq += 1
                    self._batch.append((seq, b"id: " + event_id(self.run_id, seq).encode() + b"\n" + tail))
                self._flush()
            try:
                self._store.finish(self.run_id, status)
            except Exception as exc:
                self._options.logger.error(
                    "run %s: the run store did not take its end (%s)", self.run_id, exc
                )
        finally:
            close_stream_source(
                self._source,
                self.token,
                ended_by or "closed",
                early=ended_by is not None,
                options=self._options,
            )
            self._greenlet = None
            self._on_end(self.run_id)
