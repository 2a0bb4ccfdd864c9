"""The view that serves every registered function: request in, stream or JSON out.

Everything that can fail because of the request is checked here before the first byte:
headers are frozen once a streaming body starts.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from flask import Request, Response, current_app, request
from werkzeug.exceptions import HTTPException

from .auth import authenticate
from .binding import MAX_KEY_SHOWN, NAME_PATTERN
from .body_timeout import with_deadline
from .cancellation import TOKEN_VAR, CancelToken
from .concurrency import gevent_patched
from .disconnect import Interrupted, interrupt_on_disconnect
from .errors import RequestError, UnreadableBody
from .events import json_value
from .negotiation import STREAM, request_id, wants_stream
from .payload import read_json_object
from .registry import EXTENSION_KEY
from .responses import error_response, json_response, options_response, stream_response
from .runs.responses import respond_async, resume_on_function_url, start_run
from .streaming import StreamOptions, close_stream_source
from .threads import call_in_thread

if TYPE_CHECKING:
    from .registry import RegisteredFunction, State

__all__ = ["EXTENSION_KEY", "MAX_JSON_ITEMS", "call_function", "unknown_path"]

#: The most items a generator may yield for a client that accepts only JSON (406 beyond): the
#: whole list is held in memory, and the client gets nothing until the last item.
MAX_JSON_ITEMS = 100_000


def _unknown(name: str) -> RequestError:
    shown = f" {name!r}" if len(name) <= MAX_KEY_SHOWN and NAME_PATTERN.match(name) else ""
    return RequestError(404, f"no function named{shown}" if shown else "no such function")


def unknown_path(rest: str) -> Response:
    """A JSON 404 for any other path under a non-empty ``url_prefix`` (``/api/a/b``, ``/api/run/``).

    ``rest`` is what follows the prefix; it is not echoed.
    """
    rid = request_id(request.environ.get("HTTP_X_REQUEST_ID"))
    return error_response(RequestError(404, "no such function"), rid)


def _in_thread_pool(parse: Callable[[bytes], dict[str, Any]], raw: bytes) -> dict[str, Any]:
    return call_in_thread(functools.partial(parse, raw))


def call_function(name: str, functions: Mapping[str, RegisteredFunction], prefix: str = "") -> Response:
    """Validate the request, call the function ``name`` and answer with a stream or JSON.

    ``functions`` is the registry of the :class:`~flask_sse_run.SSERun` instance whose URL rule
    matched, ``prefix`` its ``url_prefix`` (the view is bound to both with
    ``functools.partial``). The rule matches every method: ``OPTIONS`` is answered ``204`` and a
    method the function is not served with ``405``, both with ``Allow``. ``GET`` binds the query
    string, ``POST`` the JSON body. A resumable function's stream is a run (see
    :mod:`flask_sse_run.runs`); a request with ``Last-Event-ID`` reconnects to one. A generator
    collected for a JSON client may yield at most ``MAX_JSON_ITEMS`` items (406).
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
            return options_response(registered.allow, rid)
        if req.method not in registered.methods:
            raise RequestError(
                405, f"this endpoint accepts {' or '.join(registered.methods)} only",
                headers={"Allow": registered.allow},
            )  # fmt: skip
        if not registered.public:  # before the body is read: strangers cannot make us wait for it
            authenticate(state.auth, req.environ.get("HTTP_AUTHORIZATION"), rid)
        resumable = settings.resumable if registered.resumable is None else registered.resumable
        if resumable and "HTTP_LAST_EVENT_ID" in req.environ:
            # A client reconnecting (EventSource does it by itself): its body and query start
            # nothing.
            return resume_on_function_url(state, name, prefix, req, rid)
        stream = wants_stream(req.environ.get("HTTP_ACCEPT"), req)
        if req.method == "GET":
            payload = registered.binder.query_payload(req.args)
        else:
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

    if isinstance(result, Iterator):
        if resumable and (stream or respond_async(req)):
            return start_run(state, name, prefix, result, req, rid)
        if stream:
            observers = state.observers
            record = None if observers is None else observers.stream(prefix, name, rid)
            return stream_response(result, req, settings, rid, token, record=record)
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
        return json_response(body_json, 200, rid)
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
