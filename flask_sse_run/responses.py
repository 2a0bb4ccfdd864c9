"""The responses the extension sends: JSON documents and errors, ``OPTIONS`` answers, streams.

A stream's headers are all decided here, before its first byte: ``text/event-stream``, no
caching, no proxy buffering (``X-Accel-Buffering: no``), the request id, gzip when asked for,
and for a resumable run its ``X-Run-ID``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Request, Response, current_app, stream_with_context

from .cancellation import CancelToken
from .concurrency import gevent_patched
from .errors import RequestError
from .events import json_dumps
from .streaming import ObservedBody, StreamOptions, StreamResponse, TrustedHeaders, inline_body

if TYPE_CHECKING:
    from .config import Settings
    from .gevent_stream import GeventStream
    from .stream_record import StreamRecord

__all__ = ["error_response", "json_response", "no_content", "options_response", "stream_response"]


def json_response(body: Any, status: int, rid: str, headers: dict[str, str] | None = None) -> Response:
    """``body`` as compact JSON, with the request id."""
    response = Response(json_dumps(body), status=status, mimetype="application/json")
    response.headers["X-Request-ID"] = rid
    response.headers.update(headers or {})
    return response


def error_response(exc: RequestError, rid: str) -> Response:
    """The JSON response for a rejected request."""
    return json_response(exc.body(), exc.status, rid, exc.headers)


def no_content(rid: str, headers: dict[str, str] | None = None) -> Response:
    """A ``204`` with no Content-Type (Werkzeug's default, text/html, for a body-less answer)."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    response.headers["X-Request-ID"] = rid
    response.headers.update(headers or {})
    return response


def options_response(allow: str, rid: str) -> Response:
    """The ``204`` answer to ``OPTIONS``: the methods the URL accepts, in ``Allow``."""
    return no_content(rid, {"Allow": allow})


_GeventStream: type[GeventStream] | None = None


def _gevent_stream() -> type[GeventStream]:
    # Imported on first use, when gevent has patched the process; kept (this is per request).
    global _GeventStream
    if _GeventStream is None:
        from .gevent_stream import GeventStream

        _GeventStream = GeventStream
    return _GeventStream


def _accepts_gzip(req: Request) -> bool:
    if "HTTP_ACCEPT_ENCODING" not in req.environ:
        return False
    return req.accept_encodings.best_match(["gzip", "identity"]) == "gzip"


def stream_response(
    source: Iterator[Any],
    req: Request,
    settings: Settings,
    rid: str,
    token: CancelToken,
    *,
    run_id: str | None = None,
    stored: bool = False,
    record: StreamRecord | None = None,
    closer: Callable[[BaseException | None, bool], bytes] | None = None,
) -> Response:
    """Stream ``source`` as Server-Sent Events.

    With ``run_id`` the source is a resumable run's tail: it yields the run's own stored
    events, its end among them, so no end event is added here, and the response says which
    run it follows (``X-Run-ID``). ``record`` (when the app observes streams) counts what the
    stream sends, and is told how it ended. ``closer(error, shutdown)`` writes the stream's end
    instead of the settings' error, end and shutdown events (a protocol of its own: OpenAI's
    chunks end with ``data: [DONE]``); keep-alive comments, gzip and disconnects are unchanged.
    """
    gzip = settings.gzip and _accepts_gzip(req)
    stored = stored or run_id is not None
    options = StreamOptions(
        request_id=rid,
        logger=current_app.logger,
        expose_errors=settings.expose_errors,
        end_event=None if stored else settings.end_event,
        shutdown_event=settings.shutdown_event,
        keepalive=settings.keepalive,
        gzip=gzip,
        send_timeout=settings.send_timeout,
        record=record,
        closer=closer,
    )
    if not stored:  # a tail reads the store only: it needs no request context
        source = stream_with_context(source)
    body: Iterable[bytes]
    if gevent_patched():
        body = _gevent_stream()(source, options, token=token, sock=req.environ.get("gunicorn.socket"))
    else:
        body = inline_body(source, options, token=token)
        if record is not None:
            body = ObservedBody(body, record)
    # The request id is the client's only if it matched negotiation's plain pattern.
    headers = [
        ("Content-Type", "text/event-stream; charset=utf-8"),
        ("Cache-Control", "no-cache"),
        ("X-Accel-Buffering", "no"),
        ("X-Request-ID", rid),
    ]
    if run_id is not None:
        headers.append(("X-Run-ID", run_id))
    if settings.gzip:
        headers.append(("Vary", "Accept-Encoding"))
    if gzip:
        headers.append(("Content-Encoding", "gzip"))
    response = StreamResponse(body, status=200, headers=TrustedHeaders(headers), direct_passthrough=True)
    response.record = record
    return response
