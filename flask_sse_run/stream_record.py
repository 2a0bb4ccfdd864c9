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
=============  ===============================================================================

A failing observer (a full disk under the log, a metrics directory gone) is logged and never
breaks the end of a stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.util import find_spec
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .config import Settings
    from .metrics import StreamMetrics
    from .tracing import TakenSpan

__all__ = ["ENDS", "Observers", "StreamRecord", "end_reason"]

#: Every reason a stream can end for.
ENDS = ("complete", "error", "disconnect", "shutdown", "cancelled")

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


@dataclass(frozen=True, slots=True)
class Observers:
    """Who is told of each stream of an app: metrics, the trace, the log (``None``: no one)."""

    metrics: StreamMetrics | None = None
    #: Whether opentelemetry-instrumentation-flask is installed (its span is ended by the stream).
    tracing: bool = False
    #: Whether each stream's end is logged (``flask_sse_run.streams``, INFO).
    log: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Observers | None:
        """The observers ``settings`` ask for; ``None`` when there are none.

        Raises :class:`ConfigurationError` when ``SSE_RUN_METRICS`` is on without
        prometheus_client installed.
        """
        metrics = None
        if settings.metrics:
            try:
                from .metrics import stream_metrics
            except ImportError:
                raise ConfigurationError(
                    "SSE_RUN_METRICS needs prometheus_client: pip install 'flask-sse-run[metrics]'"
                ) from None
            metrics = stream_metrics()
        tracing = _installed("opentelemetry.instrumentation.flask")
        if metrics is None and not tracing and not settings.stream_log:
            return None
        return cls(metrics=metrics, tracing=tracing, log=settings.stream_log)

    def stream(self, prefix: str, function: str, request_id: str, run_id: str | None = None) -> StreamRecord:
        """A record for a new stream of ``{prefix}/{function}``; its clock starts now."""
        name = f"{prefix.strip('/')}/{function}" if prefix else function
        return StreamRecord(self, name, request_id, run_id)


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


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
        self.span: TakenSpan | None = None
        self.state = "new"  # then "running", then "ended"

    def take_span(self, environ: dict[str, Any]) -> None:
        """Take the request's span from the Flask instrumentation (see :mod:`.tracing`)."""
        if self.observers.tracing:
            from .tracing import take_span

            self.span = take_span(environ)

    def begin(self) -> None:
        """The body starts: the stream counts as active until :meth:`finish`."""
        if self.state != "new":
            return
        self.state = "running"
        metrics = self.observers.metrics
        if metrics is not None:
            metrics.started()

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
        observers = self.observers
        try:
            if observers.metrics is not None:
                observers.metrics.ended(self, end, duration)
        except Exception:
            logger.exception("stream %s: its metrics could not be recorded", self.request_id)
        try:
            if self.span is not None:
                from .tracing import end_span

                span, self.span = self.span, None
                end_span(span, self, end)
        except Exception:
            logger.exception("stream %s: its span could not be ended", self.request_id)
        if observers.log:
            from .stream_log import log_stream

            log_stream(self, end, duration)
