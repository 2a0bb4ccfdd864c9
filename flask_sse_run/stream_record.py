"""What one stream did, counted while it runs and handed at its end to metrics, the trace and the log.

A stream is a function's streamed response, or a response that follows a resumable run (its run
id is in ``X-Run-ID``). When the app observes streams (:class:`Observers`: ``SSE_RUN_METRICS``,
``SSE_RUN_STREAM_LOG``, or opentelemetry-instrumentation-flask installed), each stream gets a
:class:`StreamRecord`; otherwise it gets none, and its body does nothing more than before but
one ``if`` per write.

The body counts per write, never per event: the events it writes (the items it joined; in a
response that follows a run, whose items are the run's stored batches, the blank lines that end
them), and the bytes it hands the server (gzipped, keep-alive pings included; a ping is no
event). At the end it names why the stream ended, one of :data:`ENDS`:

=============  ===============================================================================
``complete``   the generator finished, or the run that the response followed did
``error``      the generator raised (its ``error`` event was sent), or the followed run did
``disconnect`` the client left, or a write failed
``shutdown``   the worker shut down (the shutdown event was sent)
``cancelled``  the followed run was cancelled (``DELETE``, or no client within the window)
``lost``       the worker producing the followed run was lost (a shared store's lease lapsed)
=============  ===============================================================================

A failing observer (a full disk under the log, a metrics directory gone) is logged and never
breaks the end of a stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from time import perf_counter
from typing import Any

__all__ = ["ENDS", "Observer", "Observers", "StreamRecord", "end_reason"]

#: Every reason a stream can end for.
ENDS = ("complete", "error", "disconnect", "shutdown", "cancelled", "lost")

logger = logging.getLogger(__name__)


def end_reason(ended_by: str | None, error: BaseException | None, outcome: str | None = None) -> str:
    """Why a stream ended: from what ended its body (``disconnect``, ``shutdown``, ``closed`` by
    the server, or ``None``: its source ended), an error in its generator, and how the run that
    it followed ended (``outcome``)."""
    if error is not None:
        return "error"
    if ended_by is None:
        return outcome if outcome in ENDS else "complete"
    return "shutdown" if ended_by == "shutdown" else "disconnect"


class Observer:
    """Told of each stream: the metrics, the trace, the log (:mod:`.observers` makes them). Each
    method does nothing unless overridden; observers depend on the record, never the reverse."""

    def called(self, record: StreamRecord, environ: dict[str, Any]) -> None:
        """The server called the stream's response (still inside the request)."""

    def started(self, record: StreamRecord) -> None:
        """The stream's body started."""

    def ended(self, record: StreamRecord, end: str, duration: float) -> None:
        """The stream ended (``end``: one of :data:`ENDS`), ``duration`` seconds after its record
        was made."""


@dataclass(frozen=True, slots=True)
class Observers:
    """Who is told of each stream of an app (``None`` in its state: no one)."""

    members: tuple[Observer, ...]

    def stream(self, prefix: str, function: str, request_id: str, run_id: str | None = None) -> StreamRecord:
        """A record for a new stream of ``{prefix}/{function}``; its clock starts now."""
        name = f"{prefix.strip('/')}/{function}" if prefix else function
        return StreamRecord(self, name, request_id, run_id)


class StreamRecord:
    """One stream's counts; see the module docstring."""

    __slots__ = (
        "bytes",
        "events",
        "first_event",
        "function",
        "observers",
        "outcome",
        "request_id",
        "run_id",
        "span",
        "started",
        "state",
    )

    def __init__(self, observers: Observers, function: str, request_id: str, run_id: str | None) -> None:
        self.observers = observers
        #: The function's name (``falcon/run`` under the prefix ``/falcon``).
        self.function = function
        self.request_id = request_id
        self.run_id = run_id
        self.started = perf_counter()
        #: Seconds from the record's making (the response) to the write of the first event.
        self.first_event: float | None = None
        self.events = 0
        self.bytes = 0
        #: How the run this response follows ended (its stored status), once the tail saw it.
        self.outcome: str | None = None
        #: The request's trace span, while the tracing observer holds it.
        self.span: Any = None
        self.state = "new"  # then "running", then "ended"

    def called(self, environ: dict[str, Any]) -> None:
        """The server called the response: observers that act inside the request do now."""
        for observer in self.observers.members:
            try:
                observer.called(self, environ)
            except Exception:
                logger.exception("stream %s: %s failed", self.request_id, type(observer).__name__)

    def begin(self) -> None:
        """The body starts: the stream counts as active until :meth:`finish`."""
        if self.state != "new":
            return
        self.state = "running"
        for observer in self.observers.members:
            try:
                observer.started(self)
            except Exception:
                logger.exception("stream %s: %s failed", self.request_id, type(observer).__name__)

    def wrote(self, items: int, data: bytes, nbytes: int) -> None:
        """One write of ``items`` encoded items (``data``, before gzip) in ``nbytes`` bytes.

        An item is one event, except in a response that follows a run: there an item is a batch
        of the run's stored events, which are counted by the blank line that ends each one.
        """
        events = items if self.run_id is None else data.count(b"\n\n")
        if events and self.first_event is None:
            self.first_event = perf_counter() - self.started
        self.events += events
        self.bytes += nbytes

    def finish(self, ended_by: str | None, error: BaseException | None) -> None:
        """The stream ended (see :func:`end_reason`): tell every observer, once (later calls
        do nothing)."""
        if self.state == "ended":
            return
        self.begin()  # if closed before its first step: it ends all the same
        self.state = "ended"
        end = end_reason(ended_by, error, self.outcome)
        duration = perf_counter() - self.started
        for observer in self.observers.members:
            try:
                observer.ended(self, end, duration)
            except Exception:
                logger.exception("stream %s: %s failed at its end", self.request_id, type(observer).__name__)
