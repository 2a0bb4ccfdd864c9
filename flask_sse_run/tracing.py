"""A stream's request span ends when the stream ends (opentelemetry-instrumentation-flask).

The Flask instrumentation starts the request's span in ``before_request`` and ends it in
``teardown_request``, which for a streamed response runs when the view has returned, before the
body is sent (opentelemetry-python-contrib #3401): a ten-minute stream shows as a 2 ms span,
and nothing says how it went. Our fix, at the WSGI level, with no change to the instrumentation:

* when the server calls the stream's response (``StreamResponse.__call__``, still inside the
  request), :func:`take_span` moves the span's activation and context token out of the WSGI
  environ, where the instrumentation keeps them (under its private keys, which
  ``tests/test_tracing.py`` checks against the installed version), so its teardown finds
  nothing to end;
* the stream's end (:func:`end_span`) does what that teardown would have done, in the same
  order and in the same greenlet (or thread): it sets the stream's attributes, ends the span and
  detaches the context.

The span stays current while the body runs, so spans the generator starts are its children.
Attributes: ``sse_run.function``, ``sse_run.events``, ``sse_run.bytes``, ``sse_run.end`` (see
:data:`~flask_sse_run.stream_record.ENDS`) and, for a response that follows a run,
``sse_run.run_id``; an ``error`` end also sets the span's status to ``ERROR``.

Imported only when opentelemetry-instrumentation-flask is installed. Apps served with the WSGI
middleware (``OpenTelemetryMiddleware``) need none of this: it ends spans when the body closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .extras import missing_extra

try:
    from opentelemetry import context
    from opentelemetry.trace import Span, Status, StatusCode
except ImportError as error:
    raise missing_extra("tracing", error) from error

from .stream_record import Observer, StreamRecord

__all__ = ["ACTIVATION_KEY", "SPAN_KEY", "TOKEN_KEY", "SpanObserver", "TakenSpan", "end_span", "take_span"]

#: Where opentelemetry-instrumentation-flask keeps the request's span, the context manager that
#: made it current (and ends it on exit), and the context token it detaches in teardown.
SPAN_KEY = "opentelemetry-flask.span_key"
ACTIVATION_KEY = "opentelemetry-flask.activation_key"
TOKEN_KEY = "opentelemetry-flask.token"


@dataclass(frozen=True, slots=True)
class TakenSpan:
    """A request span that the stream ends."""

    span: Span | None
    activation: Any
    token: Any


def take_span(environ: dict[str, Any]) -> TakenSpan | None:
    """Take the request's span from the instrumentation, if it made one; ``None`` otherwise."""
    activation = environ.pop(ACTIVATION_KEY, None)
    if activation is None:  # not instrumented, an excluded URL, or a span ended already
        return None
    return TakenSpan(environ.get(SPAN_KEY), activation, environ.pop(TOKEN_KEY, None))


def end_span(taken: TakenSpan, record: StreamRecord, end: str) -> None:
    """Set the stream's attributes on the span, end it, and detach its context."""
    span = taken.span
    try:
        if span is not None and span.is_recording():
            attributes: dict[str, Any] = {
                "sse_run.function": record.function,
                "sse_run.events": record.events,
                "sse_run.bytes": record.bytes,
                "sse_run.end": end,
            }
            if record.run_id is not None:
                attributes["sse_run.run_id"] = record.run_id
            span.set_attributes(attributes)
            if end == "error":
                span.set_status(Status(StatusCode.ERROR, "the stream ended with an error event"))
        taken.activation.__exit__(None, None, None)  # ends the span (use_span(end_on_exit=True))
    finally:
        if taken.token is not None:
            context.detach(taken.token)


class SpanObserver(Observer):
    """Moves each stream's request span out of the instrumentation's reach, and ends it with
    the stream."""

    def called(self, record: StreamRecord, environ: dict[str, Any]) -> None:
        """Take the request's span (the instrumentation's teardown then finds nothing to end)."""
        record.span = take_span(environ)

    def ended(self, record: StreamRecord, end: str, duration: float) -> None:
        """End the span, with the stream's attributes."""
        taken, record.span = record.span, None
        if isinstance(taken, TakenSpan):
            end_span(taken, record, end)
