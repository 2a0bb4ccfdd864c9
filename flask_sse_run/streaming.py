"""The body of a streaming response: each yielded item goes out as one SSE event.

Two bodies share these rules. Under gevent (gunicorn ``-k gevent``) it is
:class:`~flask_sse_run.gevent_stream.GeventStream`: the generator runs in the request's
greenlet, and keep-alive, instant disconnect detection, write coalescing and graceful shutdown
are driven from the gevent hub. Anywhere else (gunicorn's
sync and gthread workers, the Flask development server, the test client) it is
:func:`inline_body`: the generator runs in the request's own thread, each item is written as
it is yielded, but no ``: ping`` is sent while the generator blocks and a vanished client is
only noticed at the next write.

Either way nothing buffers between the yield and the server's write; an exception in the
generator becomes one ``error`` event and a clean end of the body; closing the body (client
gone) closes the generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Response
from werkzeug.datastructures import Headers

from .cancellation import TOKEN_VAR, CancelToken
from .compression import GzipStream
from .errors import UpstreamError
from .events import Event, encode

if TYPE_CHECKING:
    from .stream_record import StreamRecord

__all__ = [
    "ObservedBody",
    "StreamOptions",
    "StreamResponse",
    "TrustedHeaders",
    "close_iterator",
    "close_stream_source",
    "closing_events",
    "error_event",
    "inline_body",
]


@dataclass(slots=True)
class StreamOptions:
    """What a stream needs to know from the settings and the request."""

    request_id: str
    logger: logging.Logger
    expose_errors: bool = False
    end_event: str | None = None
    shutdown_event: str = "shutdown"
    keepalive: float = 0.0
    gzip: bool = False
    send_timeout: float = 0.0
    #: What the stream did, for metrics, the trace and the log; ``None`` when nobody asks.
    record: StreamRecord | None = None
    #: Writes what ends the stream instead of the events above, for a wire protocol of its own
    #: (OpenAI's ``data: [DONE]``): called with the generator's error (``None`` when it finished)
    #: and whether the worker is shutting down. A disconnect writes nothing, as always.
    closer: Callable[[BaseException | None, bool], bytes] | None = None

    def new_gzip(self) -> GzipStream | None:
        """A compressor for this stream, if it is gzipped."""
        return GzipStream() if self.gzip else None


def error_event(exc: BaseException, *, expose: bool, request_id: str) -> bytes:
    """The ``error`` event that ends a stream whose generator raised ``exc``.

    An :class:`~flask_sse_run.errors.UpstreamError` always shows its message and status: it
    says what the upstream did, which the client needs to know (retry, or fix the request).
    """
    if isinstance(exc, UpstreamError):
        data: dict[str, object] = {"type": "UpstreamError", "message": exc.message, "status": exc.status}
    elif expose:
        data = {"type": type(exc).__name__, "message": str(exc)}
    else:
        data = {"type": "InternalError", "message": f"the stream failed (request id {request_id})"}
    return Event(data=data, event="error").encode()


def closing_events(options: StreamOptions, error: BaseException | None, *, shutdown: bool = False) -> bytes:
    """What ends a stream: its shutdown event, its error event, its end event, or nothing (or
    what its ``closer`` writes instead)."""
    if options.closer is not None:
        return options.closer(error, shutdown)
    if shutdown:
        return Event(data="", event=options.shutdown_event).encode()
    if error is not None:
        return error_event(error, expose=options.expose_errors, request_id=options.request_id)
    if options.end_event is not None:
        return Event(data="", event=options.end_event).encode()
    return b""


def close_iterator(source: Any) -> None:
    """Close a generator (or any iterator with ``close``) so its ``finally`` blocks run."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


def close_stream_source(
    source: Any, token: CancelToken, reason: str, *, early: bool, options: StreamOptions
) -> None:
    """Close ``source`` with ``token`` current (its ``finally`` blocks run now); cancel ``token``.

    ``early``: the stream ends before its generator did (the client left, the worker shuts
    down, the server closed the body after a failed write). The token is then cancelled first,
    so the generator's ``finally`` sees ``disconnected()`` true, as it does when interrupted.
    Otherwise (the generator ended or failed, or an item could not be encoded: the client is
    still there) it is cancelled after.

    A generator whose closing fails (its ``finally`` raises, or it ignores ``GeneratorExit``)
    is logged once, with the request id, and never raises here: the client still gets the
    stream's clean end.
    """
    if early:
        token.cancel(reason)
    bound = TOKEN_VAR.set(token)
    try:
        close_iterator(source)
    except Exception as exc:
        options.logger.error("stream %s: closing the generator failed", options.request_id, exc_info=exc)
    finally:
        TOKEN_VAR.reset(bound)
        token.cancel(reason)


def inline_body(source: Iterator[Any], options: StreamOptions, *, token: CancelToken) -> Iterator[bytes]:
    """Encode ``source`` in the calling thread, one write per event."""
    gzip = options.new_gzip()
    write = gzip.write if gzip is not None else bytes
    record = options.record
    if record is not None:
        record.begin()
    error: BaseException | None = None
    ended_by: str | None = None
    try:
        try:
            while True:
                # The token is bound around each step only: a context variable set across a
                # yield would leak into, and have to be reset from, whatever context the server
                # is in.
                bound = TOKEN_VAR.set(token)
                try:
                    item = next(source)
                except StopIteration:
                    break
                finally:
                    TOKEN_VAR.reset(bound)
                yield _written(record, write, encode(item))
        except GeneratorExit:  # the server closed the body (a write failed: the client is gone)
            ended_by = "closed"
            raise
        except Exception as exc:
            error = exc
            options.logger.error("stream %s failed", options.request_id, exc_info=exc)
        finally:
            close_stream_source(source, token, "closed", early=ended_by is not None, options=options)
        tail = closing_events(options, error)
        if tail:
            yield _written(record, write, tail)
        if gzip is not None:
            end = gzip.finish()
            if record is not None:
                record.wrote(0, b"", len(end))
            yield end
    except GeneratorExit:  # while the closing event was written
        ended_by = "closed"
        raise
    finally:
        if record is not None:
            record.finish(ended_by, error)


def _written(record: StreamRecord | None, write: Any, data: bytes) -> bytes:
    out: bytes = write(data)
    if record is not None:
        record.wrote(1, data, len(out))
    return out


class ObservedBody:
    """An :func:`inline_body` whose record ends even if the server closes it unstarted.

    (Closing a generator that never ran runs none of its code.)
    """

    __slots__ = ("_body", "_record")

    def __init__(self, body: Iterator[bytes], record: StreamRecord) -> None:
        self._body = body
        self._record = record

    def __iter__(self) -> Iterator[bytes]:
        return self._body

    def close(self) -> None:
        """Close the body; its record ends as a disconnect if the body had not ended it."""
        try:
            close_iterator(self._body)
        finally:
            self._record.finish("closed", None)


class TrustedHeaders(Headers):
    """Headers taken as they are, for values this package made (or validated) itself.

    ``Headers(items)`` checks every name and value for newlines, which for a stream's half a
    dozen fixed headers was a measurable part of a short request's cost.
    """

    def __init__(self, items: list[tuple[str, str]]) -> None:
        # Werkzeug's Headers keeps its items in ``_list``; every read and write goes through it.
        self._list = items

    def copy(self) -> TrustedHeaders:
        """A separate copy (Werkzeug's, ``self.__class__(self._list)``, would share the list)."""
        return TrustedHeaders(list(self._list))

    __copy__ = copy


class StreamResponse(Response):
    """A ``text/event-stream`` response that hands the server's ``write`` callable to its body.

    ``start_response`` returns the WSGI ``write`` callable; the gevent body uses it to send
    keep-alive comments and held events while the generator is blocked.
    """

    #: What the stream did (see :mod:`.stream_record`), when the app observes streams.
    record: StreamRecord | None = None

    def get_wsgi_headers(self, environ: Any) -> Any:
        """The headers as they are: a stream has no Location or Content-Length to fix up.

        Werkzeug's version copies every header (validating each again) for that, per request.
        """
        return self.headers

    def __call__(self, environ: Any, start_response: Any) -> Any:
        app_iter, status, headers = self.get_wsgi_response(environ)
        if self.record is not None:  # still inside the request: before Flask's teardown
            self.record.called(environ)
        write = start_response(status, headers)
        attach = getattr(self.response, "attach_writer", None)
        if attach is not None and callable(write):
            attach(write)
        return app_iter
