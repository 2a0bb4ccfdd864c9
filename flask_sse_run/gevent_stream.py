"""The streaming body under gevent (gunicorn ``-k gevent``).

The generator runs in the request's own greenlet, as with plain Flask streaming, so a stream
costs no more memory than one (measured: a second greenlet per stream, fed through a buffer,
cost 5.5 KiB more per stream). What plain Flask cannot do is done from the gevent hub, with
the WSGI ``write`` callable that ``start_response`` returns (:class:`StreamResponse` keeps it):

* **keep-alive**: a timer re-armed at every write; when it fires while the generator is
  blocked, a short-lived greenlet writes ``: ping``. The generator does not cooperate.
* **disconnects**: a read watcher on the socket sees the client's FIN/RST at once. If the
  generator is blocked, :class:`Interrupted` is thrown into it where it waits, so its
  ``finally`` blocks run now, not at the next write; its :class:`~flask_sse_run.CancelToken`
  is cancelled first, so threads working for it (``iterate_in_thread``) stop too.
* **write coalescing**: while the generator returns items without blocking, they are held and
  sent together (at most ``BATCH_EVENTS`` or ``FAIR_SLICE`` seconds' worth); the first event of
  a stream is always sent at once. The moment the
  generator blocks with events held, a hub callback sends them: an event is never delayed by
  a slow generator.
* **fairness**: a generator that never blocks still gives the hub a turn every ``FAIR_SLICE``
  seconds, so other streams and gunicorn's heartbeat keep running.
* **graceful shutdown**: :func:`~flask_sse_run.shutdown.begin_shutdown` interrupts the stream
  like a disconnect, then the shutdown event is written and the body ends properly.

Writes never overlap: a helper greenlet writes only while the request greenlet is inside the
generator, and the request greenlet waits for it before writing itself. Without a ``write``
callable (an ``after_request`` hook replaced the response), every event is sent at once and
no ping is sent while the generator blocks.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Generator, Iterator
from time import monotonic, perf_counter
from typing import Any

import gevent
from gevent.event import Event as GEvent

from . import shutdown
from .cancellation import TOKEN_VAR, CancelToken
from .deadlines import deadlines
from .disconnect import Interrupted, limit_unacknowledged, watch_for_disconnect
from .events import KEEPALIVE, encode
from .streaming import StreamOptions, close_stream_source, closing_events

__all__ = ["BATCH_EVENTS", "FAIR_SLICE", "GeventStream", "Interrupted"]

#: Longest a never-blocking generator runs before the hub gets a turn (seconds).
FAIR_SLICE = 0.005
#: Most events sent in one write.
BATCH_EVENTS = 64


def _send_timed_out() -> OSError:
    # EPIPE: gunicorn treats the write as a client gone (it closes the body, then the socket,
    # and logs nothing at its default level), which is what a client that takes nothing is.
    return BrokenPipeError(errno.EPIPE, "the client took no data for SSE_RUN_SEND_TIMEOUT seconds")


class GeventStream:
    """A WSGI body iterable; see the module docstring."""

    __slots__ = (
        "__weakref__",
        "_ended_by",
        "_greenlet",
        "_gzip",
        "_helper_done",
        "_in_generator",
        "_interrupting",
        "_options",
        "_pending",
        "_running",
        "_scheduled",
        "_sock",
        "_source",
        "_timer",
        "_token",
        "_watcher",
        "_write",
        "_writing",
    )

    def __init__(
        self, source: Iterator[Any], options: StreamOptions, *, token: CancelToken, sock: Any
    ) -> None:
        self._source = source
        self._options = options
        self._token = token
        self._sock = sock
        self._write: Callable[[bytes], Any] | None = None
        self._gzip = options.new_gzip()
        self._pending: list[bytes] = []
        self._in_generator = False
        self._writing = False
        self._scheduled = False
        self._interrupting = False
        self._ended_by: str | None = None  # "disconnect" or "shutdown"
        self._greenlet: Any = None
        self._timer: Any = None
        self._watcher: Any = None
        self._helper_done: Any = None
        self._running: Generator[bytes, None, None] | None = None

    def attach_writer(self, write: Callable[[bytes], Any]) -> None:
        """Give the body the server's WSGI ``write`` callable (see :class:`StreamResponse`)."""
        self._write = write

    def __iter__(self) -> Generator[bytes, None, None]:
        self._running = self._run()
        return self._running

    def close(self) -> None:
        """Close the body (WSGI servers call this): the generator's ``finally`` runs here and now."""
        if self._running is not None:
            self._running.close()
        else:  # never iterated: still close the user's generator
            close_stream_source(self._source, self._token, "closed", early=True, options=self._options)

    # -- the request greenlet ---------------------------------------------------------------

    def _run(self) -> Generator[bytes, None, None]:
        options = self._options
        loop = gevent.get_hub().loop
        self._greenlet = gevent.getcurrent()
        helpers = self._write is not None
        # Watchers are armed at the hub's first turn: only a stream whose generator blocks (or
        # whose client reads slowly) needs them, and most short streams end before that.
        loop.run_callback(self._arm)
        source, pending, token = self._source, self._pending, self._token
        error: BaseException | None = None
        try:
            turn, started = loop.iteration, perf_counter()
            first = True
            while self._ended_by is None:
                if pending and not self._scheduled:
                    self._scheduled = True
                    loop.run_callback(self._hub_turn)
                before = loop.iteration
                self._in_generator = True
                bound = TOKEN_VAR.set(token)
                try:
                    pending.append(encode(next(source)))  # encode() never switches greenlets
                except (StopIteration, Interrupted):
                    break
                except Exception as exc:  # from the generator or from encoding what it yielded
                    error = exc
                    options.logger.error("stream %s failed", options.request_id, exc_info=exc)
                    break
                finally:
                    self._in_generator = False
                    TOKEN_VAR.reset(bound)
                if self._writing:
                    self._wait_for_helper()
                blocked = loop.iteration != before
                if blocked or not helpers or len(pending) >= BATCH_EVENTS or first:
                    # A generator that blocked is slow: what it made goes out now. Without a
                    # helper to send held events, nothing may be held. The first event always
                    # goes at once: time to first event is what a client feels (and a one-event
                    # stream's end, the request context's teardown, need not delay it).
                    first = False
                    data = self._take()
                    self._guard_write()
                    yield data
                    self._unguard_write()
                if loop.iteration != turn:  # the hub ran (in the generator or the write)
                    turn, started = loop.iteration, perf_counter()
                elif perf_counter() - started >= FAIR_SLICE:
                    if pending:
                        data = self._take()
                        self._guard_write()
                        yield data
                        self._unguard_write()
                    gevent.sleep(0)  # the generator never blocks: let the others run
                    turn, started = loop.iteration, perf_counter()
            if self._writing:
                self._wait_for_helper()
            if self._ended_by == "disconnect":
                return
            tail = closing_events(options, error, shutdown=self._ended_by == "shutdown")
            data = self._take(tail)
            if self._gzip is not None:
                data += self._gzip.finish()
            if data:
                self._guard_write()
                yield data
                self._unguard_write()
        except GeneratorExit:  # the server closed the body (a write failed: the client is gone)
            self._ended_by = self._ended_by or "closed"
            raise
        finally:
            self._unguard_write()
            early = self._ended_by is not None  # disconnect, shutdown or closed, before the end
            self._ended_by = self._ended_by or "closed"
            if self._watcher is not None:
                self._watcher.close()
            if self._timer is not None:
                self._timer.close()
                shutdown.unregister(self)
            if self._writing:
                self._wait_for_helper()
            close_stream_source(source, token, self._ended_by, early=early, options=options)
            # Break the cycles (greenlet -> frame -> body -> greenlet, and the server's response
            # object) now rather than at the next full collection.
            self._greenlet = self._write = None

    def _take(self, tail: bytes = b"") -> bytes:
        """Everything held, plus ``tail``, ready for the socket (gzipped if need be)."""
        data = b"".join(self._pending) + tail if self._pending else tail
        self._pending.clear()
        if self._timer is not None and self._timer.active:
            self._timer.again(self._keepalive_due)
        if data and self._gzip is not None:
            return self._gzip.write(data)
        return data

    def _guard_write(self) -> None:
        # The server writes what is yielded: a write still blocked after send_timeout (a
        # client that stopped reading) is ended where it waits, as a failed write is.
        if self._options.send_timeout:
            deadlines().add(self._greenlet, monotonic() + self._options.send_timeout, _send_timed_out)

    def _unguard_write(self) -> None:
        if self._options.send_timeout:
            deadlines().discard(self._greenlet)

    def _wait_for_helper(self) -> None:
        if self._helper_done is None:
            self._helper_done = GEvent()
        while self._writing:
            self._helper_done.clear()
            self._helper_done.wait()

    # -- the hub: callbacks and short-lived helper greenlets ----------------------------------

    def _arm(self) -> None:
        if self._ended_by is not None or self._timer is not None:
            return
        if shutdown.shutting_down():  # began after SIGTERM: end at once, with the shutdown event
            self._end("shutdown")
            return
        loop = gevent.get_hub().loop
        if self._sock is not None:
            self._watcher = watch_for_disconnect(self._sock, self._disconnected)
            if self._options.send_timeout:
                limit_unacknowledged(self._sock, self._options.send_timeout)
        # A timer is made even without keep-alive: it marks the stream as armed.
        keepalive = self._options.keepalive if self._write is not None else 0.0
        self._timer = loop.timer(keepalive or 86400.0, keepalive or 86400.0)
        if keepalive:
            self._timer.start(self._keepalive_due)
        shutdown.register(self)

    def _hub_turn(self) -> None:
        self._scheduled = False
        if self._in_generator and self._pending and not self._writing:
            gevent.spawn_raw(self._helper_write, False)

    def _keepalive_due(self) -> None:
        if self._in_generator and not self._writing:
            gevent.spawn_raw(self._helper_write, True)

    def _helper_write(self, ping: bool) -> None:
        # Checked again here: between the spawn and now the request greenlet may have left the
        # generator and be writing itself.
        if not self._in_generator or self._writing or self._ended_by is not None or self._write is None:
            return
        data = self._take(KEEPALIVE if ping and not self._pending else b"")
        if not data:
            return
        self._writing = True
        timeout = self._options.send_timeout
        helper = gevent.getcurrent()
        if timeout:
            deadlines().add(helper, monotonic() + timeout, _send_timed_out)
        try:
            self._write(data)
        except OSError:
            self._end("disconnect")
        finally:
            if timeout:
                deadlines().discard(helper)
            self._writing = False
            if self._helper_done is not None:
                self._helper_done.set()

    def _disconnected(self) -> None:
        self._end("disconnect")

    def shutdown(self) -> None:
        """End the stream with the shutdown event (the worker is going down)."""
        self._end("shutdown")

    def _end(self, why: str) -> None:
        if self._ended_by is not None:
            return
        self._ended_by = why
        # The interrupt is scheduled first: a token callback that raises must not stop it.
        if self._in_generator and not self._interrupting:
            self._interrupting = True
            gevent.get_hub().loop.run_callback(self._interrupt)
        self._token.cancel(why)

    def _interrupt(self) -> None:
        # Only while the greenlet is blocked inside the generator: anywhere else (a write) it
        # sees _ended_by when it next looks.
        if self._in_generator and self._greenlet is not None and not self._greenlet.dead:
            self._greenlet.throw(Interrupted(self._ended_by))
