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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Response
from werkzeug.datastructures import Headers

from .cancellation import TOKEN_VAR, CancelToken
from .compression import GzipStream
from .events import Event, encode

__all__ = [
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

    def new_gzip(self) -> GzipStream | None:
        """A compressor for this stream, if it is gzipped."""
        return GzipStream() if self.gzip else None


def error_event(exc: BaseException, *, expose: bool, request_id: str) -> bytes:
    """The ``error`` event that ends a stream whose generator raised ``exc``."""
    if expose:
        data = {"type": type(exc).__name__, "message": str(exc)}
    else:
        data = {"type": "InternalError", "message": f"the stream failed (request id {request_id})"}
    return Event(data=data, event="error").encode()


def closing_events(options: StreamOptions, error: BaseException | None, *, shutdown: bool = False) -> bytes:
    """What ends a stream: its shutdown event, its error event, its end event, or nothing."""
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
    error: BaseException | None = None
    early = False
    try:
        while True:
            # The token is bound around each step only: a context variable set across a yield
            # would leak into, and have to be reset from, whatever context the server is in.
            bound = TOKEN_VAR.set(token)
            try:
                item = next(source)
            except StopIteration:
                break
            finally:
                TOKEN_VAR.reset(bound)
            yield write(encode(item))
    except GeneratorExit:  # the server closed the body (a write failed: the client is gone)
        early = True
        raise
    except Exception as exc:
        error = exc
        options.logger.error("stream %s failed", options.request_id, exc_info=exc)
    finally:
        close_stream_source(source, token, "closed", early=early, options=options)
    tail = closing_events(options, error)
    if tail:
        yield write(tail)
    if gzip is not None:
        yield gzip.finish()


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

    def get_wsgi_headers(self, environ: Any) -> Any:
        """The headers as they are: a stream has no Location or Content-Length to fix up.

        Werkzeug's version copies every header (validating each again) for that, per request.
        """
        return self.headers

    def __call__(self, environ: Any, start_response: Any) -> Any:
        app_iter, status, headers = self.get_wsgi_response(environ)
        write = start_response(status, headers)
        attach = getattr(self.response, "attach_writer", None)
        if attach is not None and callable(write):
            attach(write)
        return app_iter
