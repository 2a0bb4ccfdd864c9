"""The view that serves every registered function: request in, stream or JSON out.

Everything that can fail because of the request is checked here before the first byte:
headers are frozen once a streaming body starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, request, stream_with_context
from werkzeug.exceptions import HTTPException

from .binding import _NAME
from .errors import RequestError
from .events import json_value
from .payload import read_json_object, request_id, wants_stream
from .streaming import close_iterator, sse_body

if TYPE_CHECKING:
    from .extension import RegisteredFunction, State

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


def call_function(name: str, functions: Mapping[str, RegisteredFunction] | None = None) -> Response:
    """Validate the request, call the function ``name`` and answer with a stream or JSON.

    ``functions`` is the registry of the :class:`~flask_sse_run.SSERun` instance whose URL rule
    matched (default: the app's first instance).
    """
    state: State = current_app.extensions[EXTENSION_KEY]
    settings = state.settings
    rid = request_id(request.headers.get("X-Request-ID"))
    try:
        registered = (state.extension.functions if functions is None else functions).get(name)
        if registered is None:
            raise _unknown(name)
        if request.method != "POST":
            raise RequestError(405, "this endpoint accepts POST only", headers={"Allow": "POST"})
        stream = wants_stream(request.accept_mimetypes)
        payload = read_json_object(
            request.stream, request.mimetype, request.content_length, settings.max_body
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
        body = sse_body(
            stream_with_context(result),
            request_id=rid,
            logger=logger,
            expose_errors=settings.expose_errors,
            end_event=settings.end_event,
        )
        response = Response(
            body, status=200, content_type="text/event-stream; charset=utf-8", direct_passthrough=True
        )
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers["X-Request-ID"] = rid
        return response

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
