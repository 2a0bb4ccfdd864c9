"""The view that serves every registered function: request in, stream or JSON out.

Everything that can fail because of the request is checked here before the first byte:
headers are frozen once a streaming body starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from flask import Request, Response, current_app, request, stream_with_context
from werkzeug.exceptions import HTTPException

from .auth import authenticate
from .binding import _NAME
from .body_timeout import with_deadline
from .cancellation import CancelToken
from .concurrency import gevent_patched
from .errors import RequestError
from .events import json_value
from .payload import read_json_object, request_id, wants_stream
from .streaming import StreamOptions, StreamResponse, close_iterator, inline_body

if TYPE_CHECKING:
    from .config import Settings
    from .extension import RegisteredFunction, State
    from .gevent_stream import GeventStream

__all__ = ["EXTENSION_KEY", "call_function", "error_response"]

EXTENSION_KEY = "sse_run"
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _json_response(body: Any, status: int, rid: str, headers: dict[str, str] | None = None) -> Response:
    response = Response(_dumps(body), status=status, mimetype="application/json")
    response.headers["X-Request-ID"] = rid
    response.headers.update(headers or {})
    return response


def error_response(exc: RequestError, rid: str) -> Response:
    """The JSON response for a rejected request."""
    return _json_response(exc.body(), exc.status, rid, exc.headers)


def _unknown(name: str) -> RequestError:
    shown = f" {name!r}" if len(name) <= 64 and _NAME.match(name) else ""
    return RequestError(404, f"no function named{shown}" if shown else "no such function")


def _gevent_stream() -> type[GeventStream]:
    # Imported on first use: the module imports gevent, which sync deployments may not load.
    from .gevent_stream import GeventStream

    return GeventStream


def _accepts_gzip(req: Request) -> bool:
    if "HTTP_ACCEPT_ENCODING" not in req.environ:
        return False
    return req.accept_encodings.best_match(["gzip", "identity"]) == "gzip"


def _stream_response(result: Iterator[Any], req: Request, settings: Settings, rid: str) -> Response:
    gzip = settings.gzip and _accepts_gzip(req)
    options = StreamOptions(
        request_id=rid,
        logger=current_app.logger,
        expose_errors=settings.expose_errors,
        end_event=settings.end_event,
        shutdown_event=settings.shutdown_event,
        keepalive=settings.keepalive,
        gzip=gzip,
    )
    token = CancelToken()
    body: Iterable[bytes]
    if gevent_patched():
        body = _gevent_stream()(
            stream_with_context(result), options, token=token, sock=req.environ.get("gunicorn.socket")
        )
    else:
        body = inline_body(stream_with_context(result), options, token=token)
    headers = [
        ("Content-Type", "text/event-stream; charset=utf-8"),
        ("Cache-Control", "no-cache"),
        ("X-Accel-Buffering", "no"),
        ("X-Request-ID", rid),
    ]
    if settings.gzip:
        headers.append(("Vary", "Accept-Encoding"))
    if gzip:
        headers.append(("Content-Encoding", "gzip"))
    return StreamResponse(body, status=200, headers=headers, direct_passthrough=True)


def call_function(name: str, functions: Mapping[str, RegisteredFunction]) -> Response:
    """Validate the request, call the function ``name`` and answer with a stream or JSON.

    ``functions`` is the registry of the :class:`~flask_sse_run.SSERun` instance whose URL rule
    matched (the view is bound to it with ``functools.partial``).
    """
    state: State = current_app.extensions[EXTENSION_KEY]
    settings = state.settings
    req: Request = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup
    rid = request_id(req.environ.get("HTTP_X_REQUEST_ID"))
    try:
        registered = functions.get(name)
        if registered is None:
            raise _unknown(name)
        if req.method != "POST":
            raise RequestError(405, "this endpoint accepts POST only", headers={"Allow": "POST"})
        if not registered.public:  # before the body is read: strangers cannot make us wait for it
            authenticate(state.auth, req.environ.get("HTTP_AUTHORIZATION"), rid)
        stream = wants_stream(req.environ.get("HTTP_ACCEPT"), req)
        payload = read_json_object(
            with_deadline(req.stream, settings.body_timeout),
            req.mimetype,
            req.content_length,
            settings.max_body,
        )
        kwargs = registered.binder.bind(payload)
    except RequestError as exc:
        return error_response(exc, rid)
    except HTTPException as exc:  # raised by Werkzeug while reading, e.g. MAX_CONTENT_LENGTH
        code = exc.code or 400
        return error_response(RequestError(code, exc.name.lower()), rid)

    logger = current_app.logger
    started = time.perf_counter()
    try:
        result = registered.func(**kwargs)
    except RequestError as exc:  # the function's own refusal (503 when busy, 422 ...)
        return error_response(exc, rid)
    except Exception:
        logger.exception("function %s failed (request id %s)", name, rid)
        return error_response(RequestError(500, "the function failed; see the server log"), rid)

    if stream and isinstance(result, Iterator):
        return _stream_response(result, req, settings, rid)

    try:
        if isinstance(result, Iterator):
            value: Any = [json_value(item) for item in result]
        else:
            value = json_value(result)
        body_json = {
            "run_id": rid,
            "run_time_ms": round((time.perf_counter() - started) * 1000, 3),
            "result": value,
        }
        return _json_response(body_json, 200, rid)
    except Exception:
        logger.exception("function %s failed (request id %s)", name, rid)
        return error_response(RequestError(500, "the function failed; see the server log"), rid)
    finally:
        if isinstance(result, Iterator):
            close_iterator(result)
