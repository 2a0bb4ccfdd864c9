"""The view that serves every registered function: request in, stream or JSON out.

Everything that can fail because of the request is checked here before the first byte:
headers are frozen once a streaming body starts.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from flask import Request, Response, current_app, request, stream_with_context
from werkzeug.exceptions import HTTPException

from .auth import authenticate
from .binding import MAX_KEY_SHOWN, NAME_PATTERN
from .body_timeout import with_deadline
from .cancellation import TOKEN_VAR, CancelToken
from .concurrency import gevent_patched
from .disconnect import Interrupted, interrupt_on_disconnect
from .errors import RequestError, UnreadableBody
from .events import json_dumps, json_value
from .negotiation import STREAM, request_id, wants_stream
from .payload import read_json_object
from .streaming import StreamOptions, StreamResponse, TrustedHeaders, close_stream_source, inline_body

if TYPE_CHECKING:
    from .config import Settings
    from .extension import RegisteredFunction, State
    from .gevent_stream import GeventStream

__all__ = [
    "ALLOW",
    "EXTENSION_KEY",
    "MAX_JSON_ITEMS",
    "call_function",
    "error_response",
    "options_response",
    "unknown_path",
]

EXTENSION_KEY = "sse_run"
#: The methods a function's URL answers (the ``Allow`` of its 204 and 405 responses).
ALLOW = "OPTIONS, POST"
#: The most items a generator may yield for a client that accepts only JSON (406 beyond): the
#: whole list is held in memory, and the client gets nothing until the last item.
MAX_JSON_ITEMS = 100_000


def _json_response(body: Any, status: int, rid: str, headers: dict[str, str] | None = None) -> Response:
    response = Response(json_dumps(body), status=status, mimetype="application/json")
    response.headers["X-Request-ID"] = rid
    response.headers.update(headers or {})
    return response


def error_response(exc: RequestError, rid: str) -> Response:
    """The JSON response for a rejected request."""
    return _json_response(exc.body(), exc.status, rid, exc.headers)


def options_response(allow: str, rid: str) -> Response:
    """The ``204`` answer to ``OPTIONS``: the methods the URL accepts, in ``Allow``."""
    response = Response(status=204)
    del response.headers["Content-Type"]  # Werkzeug's default (text/html) for a body-less answer
    response.headers["Allow"] = allow
    response.headers["X-Request-ID"] = rid
    return response


def _unknown(name: str) -> RequestError:
    shown = f" {name!r}" if len(name) <= MAX_KEY_SHOWN and NAME_PATTERN.match(name) else ""
    return RequestError(404, f"no function named{shown}" if shown else "no such function")


def unknown_path(rest: str) -> Response:
    """A JSON 404 for any other path under a non-empty ``url_prefix`` (``/api/a/b``, ``/api/run/``).

    ``rest`` is what follows the prefix; it is not echoed.
    """
    rid = request_id(request.environ.get("HTTP_X_REQUEST_ID"))
    return error_response(RequestError(404, "no such function"), rid)


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


def _stream_response(
    result: Iterator[Any], req: Request, settings: Settings, rid: str, token: CancelToken
) -> Response:
    gzip = settings.gzip and _accepts_gzip(req)
    options = StreamOptions(
        request_id=rid,
        logger=current_app.logger,
        expose_errors=settings.expose_errors,
        end_event=settings.end_event,
        shutdown_event=settings.shutdown_event,
        keepalive=settings.keepalive,
        gzip=gzip,
        send_timeout=settings.send_timeout,
    )
    body: Iterable[bytes]
    if gevent_patched():
        body = _gevent_stream()(
            stream_with_context(result), options, token=token, sock=req.environ.get("gunicorn.socket")
        )
    else:
        body = inline_body(stream_with_context(result), options, token=token)
    # The request id is the client's only if it matched negotiation's plain pattern.
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
    return StreamResponse(body, status=200, headers=TrustedHeaders(headers), direct_passthrough=True)


def _in_thread_pool(parse: Callable[[bytes], dict[str, Any]], raw: bytes) -> dict[str, Any]:
    # A native thread: the interpreter hands the GIL back to the hub's thread every few
    # milliseconds, which a parse in the hub's own thread never would.
    import gevent  # only when gevent has patched the process

    def refusal_as_value() -> dict[str, Any] | RequestError:
        # gevent's pool prints the traceback of a task that raises: a refused body is no error.
        try:
            return parse(raw)
        except RequestError as exc:
            return exc

    result = gevent.get_hub().threadpool.apply(refusal_as_value)
    if isinstance(result, RequestError):
        raise result
    return result  # type: ignore[no-any-return]


def call_function(name: str, functions: Mapping[str, RegisteredFunction]) -> Response:
    """Validate the request, call the function ``name`` and answer with a stream or JSON.

    ``functions`` is the registry of the :class:`~flask_sse_run.SSERun` instance whose URL rule
    matched (the view is bound to it with ``functools.partial``). The rule matches every method:
    ``OPTIONS`` is answered ``204`` and any method but ``POST`` ``405``, both with ``Allow``.
    A generator collected for a JSON client may yield at most ``MAX_JSON_ITEMS`` items (406).
    """
    state: State = current_app.extensions[EXTENSION_KEY]
    settings = state.settings
    req: Request = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup
    rid = request_id(req.environ.get("HTTP_X_REQUEST_ID"))
    try:
        registered = functions.get(name)
        if registered is None:
            raise _unknown(name)
        if req.method == "OPTIONS":
            return options_response(ALLOW, rid)
        if req.method != "POST":
            raise RequestError(405, "this endpoint accepts POST only", headers={"Allow": ALLOW})
        if not registered.public:  # before the body is read: strangers cannot make us wait for it
            authenticate(state.auth, req.environ.get("HTTP_AUTHORIZATION"), rid)
        stream = wants_stream(req.environ.get("HTTP_ACCEPT"), req)
        payload = read_json_object(
            with_deadline(req.stream, settings.body_timeout),
            req.environ.get("CONTENT_TYPE", ""),
            req.content_length,
            settings.max_body,
            offload=_in_thread_pool if gevent_patched() else None,
        )
        kwargs = registered.binder.bind(payload)
    except UnreadableBody as exc:
        # One line, no traceback: a broken client is not a server fault.
        current_app.logger.warning("request %s: the body could not be read (%s)", rid, exc.reason)
        return error_response(exc, rid)
    except RequestError as exc:
        return error_response(exc, rid)
    except HTTPException as exc:  # raised by Werkzeug while reading, e.g. MAX_CONTENT_LENGTH
        code = exc.code or 400
        return error_response(RequestError(code, exc.name.lower()), rid)

    logger = current_app.logger
    started = time.perf_counter()
    token = CancelToken()
    # Under gevent, a client that leaves interrupts whatever runs for it before a response
    # exists: a plain function waiting in cooperative I/O, a generator collected for JSON.
    sock = req.environ.get("gunicorn.socket") if gevent_patched() else None
    try:
        # Calling a generator function runs none of its code: nothing to watch.
        with _watching(None if registered.generator else sock, token):
            result = _call_bound(registered.func, kwargs, token)
    except RequestError as exc:  # the function's own refusal (503 when busy, 422 ...)
        return error_response(exc, rid)
    except Interrupted:
        return _client_left(name, rid)
    except Exception:
        logger.exception("function %s failed (request id %s)", name, rid)
        return error_response(RequestError(500, "the function failed; see the server log"), rid)

    if stream and isinstance(result, Iterator):
        return _stream_response(result, req, settings, rid, token)
    if isinstance(result, (Awaitable, AsyncIterator)):  # checked after the common case
        return _async_result(name, result, rid)

    interrupted = False
    try:
        if isinstance(result, Iterator):
            with _watching(sock, token):
                value = _call_bound(_collect, {"items": result}, token)
        else:
            value = json_value(result)
        body_json = {
            "run_id": rid,
            "run_time_ms": round((time.perf_counter() - started) * 1000, 3),
            "result": value,
        }
        return _json_response(body_json, 200, rid)
    except RequestError as exc:  # too many items, or the generator's own refusal
        return error_response(exc, rid)
    except Interrupted:
        interrupted = True
        return _client_left(name, rid)
    except Exception:
        logger.exception("function %s failed (request id %s)", name, rid)
        return error_response(RequestError(500, "the function failed; see the server log"), rid)
    finally:
        if isinstance(result, Iterator):
            options = StreamOptions(request_id=rid, logger=logger)
            close_stream_source(result, token, "closed", early=interrupted, options=options)


def _watching(sock: Any, token: CancelToken) -> AbstractContextManager[None]:
    return nullcontext() if sock is None else interrupt_on_disconnect(sock, token)


def _call_bound(func: Callable[..., Any], kwargs: dict[str, Any], token: CancelToken) -> Any:
    # The token is current while the function runs: disconnected() and iterate_in_thread see it.
    bound = TOKEN_VAR.set(token)
    try:
        return func(**kwargs)
    finally:
        TOKEN_VAR.reset(bound)


def _client_left(name: str, rid: str) -> Response:
    # Nobody reads this answer; 499 (nginx's "client closed request") marks it in the access log.
    current_app.logger.info("request %s: the client left; function %s was interrupted", rid, name)
    return error_response(RequestError(499, "the client closed the connection"), rid)


def _async_result(name: str, result: Awaitable[Any] | AsyncIterator[Any], rid: str) -> Response:
    # Registration refuses async functions, but a plain function can still return a coroutine
    # (or an async generator): nothing here could run it, so say so rather than fail on it.
    if inspect.iscoroutine(result):
        result.close()  # it never ran: no "coroutine was never awaited" warning
    current_app.logger.error(
        "function %s returned %s, which a WSGI worker cannot run: return a value, a generator "
        "or an iterator (request id %s)",
        name,
        type(result).__name__,
        rid,
    )
    return error_response(RequestError(500, "the function failed; see the server log"), rid)


def _collect(items: Iterator[Any]) -> list[Any]:
    # The JSON fallback runs the generator in the request's greenlet with no stream runtime
    # around it: it must bound its own memory and, under gevent, its own time on the hub.
    limit = MAX_JSON_ITEMS
    turn = _gevent_turn() if gevent_patched() else None
    collected: list[Any] = []
    for item in items:
        if len(collected) == limit:
            raise RequestError(406, f"the result has more than {limit} items; accept {STREAM} to stream it")
        collected.append(json_value(item))
        if turn is not None:
            turn()
    return collected


def _gevent_turn() -> Callable[[], None]:
    """A function to call after each item: it gives the hub a turn once a ``FAIR_SLICE`` is spent.

    A generator that never blocks would otherwise hold the worker (every other stream, and
    gunicorn's heartbeat) until its last item: the stream runtime's own fairness does not apply
    here, as the generator is not streamed.
    """
    import gevent  # only when gevent has patched the process (see gevent_patched above)

    from .gevent_stream import FAIR_SLICE

    started = time.perf_counter()

    def turn() -> None:
        nonlocal started
        if time.perf_counter() - started >= FAIR_SLICE:
            gevent.sleep(0)
            started = time.perf_counter()

    return turn
