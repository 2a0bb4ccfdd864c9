"""The HTTP side of resumable runs: starting one, reconnecting, ``/runs/<run_id>``, cancelling.

* A resumable function's stream starts a run and follows it from its first event; the response
  carries ``X-Run-ID`` and every event ``id: <run_id>:<seq>``.
* ``Prefer: respond-async`` (RFC 7240) answers ``202`` at once, with the run's URL in
  ``Location``; the run goes on with no client.
* A request to the function's URL with ``Last-Event-ID`` (what ``EventSource`` sends when it
  reconnects) follows the run from after that event; so does ``GET {prefix}/runs/<run_id>``
  (with the header, or ``?last_event_id=<seq>``).
* Nothing left to send (an ended run read to its end; on the function URL also an unknown or
  expired run) is ``204 No Content``, the spec's "stop reconnecting".
* A position beyond a running run's last event (no event of the run has it yet) is ``400``.
* ``DELETE {prefix}/runs/<run_id>`` cancels the run.

With auth on, only a token that may call the function reaches a run, and with JWTs only one
with the ``sub`` of the request that started it; any other run is answered exactly as an unknown
one (``204`` on the function URL, ``404`` on ``/runs``), so its existence is not revealed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from flask import Request, Response, current_app, request

from ..auth import authenticate, jwt_subject
from ..cancellation import CancelToken
from ..concurrency import gevent_patched
from ..errors import RequestError
from ..negotiation import STREAM, request_id, wants_stream
from ..registry import EXTENSION_KEY
from ..responses import error_response, json_response, no_content, options_response, stream_response
from ..streaming import StreamOptions
from .ids import is_run_id, parse_event_id, parse_position
from .store import RunInfo, StoreUnavailable
from .tail import beyond_message, tail

if TYPE_CHECKING:
    from ..registry import RegisteredFunction, State

__all__ = ["RUNS_ALLOW", "respond_async", "resume_on_function_url", "run_view", "start_run"]

#: The methods ``{prefix}/runs/<run_id>`` answers.
RUNS_ALLOW = "DELETE, GET, OPTIONS"


def respond_async(req: Request) -> bool:
    """Whether the client prefers a ``202`` now to a stream (``Prefer: respond-async``)."""
    prefer = req.environ.get("HTTP_PREFER")
    if not prefer:
        return False
    return any(
        part.split("=", 1)[0].strip().lower() == "respond-async"
        for preference in prefer.split(",")
        for part in preference.split(";", 1)[:1]
    )


def _reachable(info: RunInfo | None, name: str | None, prefix: str, owner: str | None = None) -> bool:
    """Whether this request may see the run: it exists, belongs to the function (when one is
    named) of this instance, and to this request's JWT subject (``owner``, when the check comes
    after the request), if the run has one."""
    if info is None or info.prefix != prefix or (name is not None and info.function != name):
        return False
    return info.owner is None or info.owner == (owner if owner is not None else jwt_subject())


def start_run(
    state: State, name: str, prefix: str, source: Iterator[Any], req: Request, rid: str
) -> Response:
    """Start a run of ``source``; stream it, or answer ``202`` for ``Prefer: respond-async``."""
    settings = state.settings
    options = StreamOptions(
        request_id=rid,
        logger=current_app.logger,
        expose_errors=settings.expose_errors,
        end_event=settings.end_event,
        shutdown_event=settings.shutdown_event,
    )
    try:
        run_id = state.runs.start(name, prefix, jwt_subject(), source, options)
    except RequestError as exc:  # the store is full or unreachable: nothing ran
        source_close = getattr(source, "close", None)
        if source_close is not None:
            source_close()
        return error_response(exc, rid)
    if respond_async(req):
        url = f"{req.script_root}{prefix}/runs/{run_id}"
        return json_response(
            {"run_id": run_id, "events": url},
            202,
            rid,
            {"Location": url, "Preference-Applied": "respond-async", "X-Run-ID": run_id},
        )
    if gevent_patched():
        import gevent

        # The new run's first turn comes before the response's: a run that makes its first event
        # without blocking is then found at the first read (a short one whole), with no wait on
        # the store and no watcher armed for a stream that ends at once.
        gevent.sleep(0)
    record = None if state.observers is None else state.observers.stream(prefix, name, rid, run_id)
    followed = tail(state.runs.store, run_id, 0, record, outage=settings.store_outage)
    return stream_response(
        followed, req, settings, rid, CancelToken(), run_id=run_id, record=record
    )  # fmt: skip


def resume_on_function_url(state: State, name: str, prefix: str, req: Request, rid: str) -> Response:
    """Follow the run named by ``Last-Event-ID`` from after that event (``204`` if there is
    nothing to follow). Raises :class:`RequestError` for a header this server did not make."""
    parsed = parse_event_id(req.environ["HTTP_LAST_EVENT_ID"])
    if parsed is None:
        raise RequestError(400, "Last-Event-ID is not an event id of this server (<run_id>:<seq>)")
    run_id, after = parsed
    try:
        info = state.runs.store.get(run_id)
    except StoreUnavailable:
        # A reconnect while the store is away: 200 and wait for it (a browser's EventSource
        # gives up for good on any other status), checking the run once it answers.
        owner = jwt_subject()
        return _follow_later(
            state, run_id, after, req, rid, lambda found: _reachable(found, name, prefix, owner)
        )
    if not _reachable(info, name, prefix):
        return no_content(rid)
    return _follow(state, info, after, req, rid)  # type: ignore[arg-type]  # reachable: not None


def _follow(state: State, info: RunInfo, after: int, req: Request, rid: str) -> Response:
    if not wants_stream(req.environ.get("HTTP_ACCEPT"), req):
        raise RequestError(406, f"a run is followed as {STREAM}")
    if not info.running and info.last_seq <= after:
        return no_content(rid, {"X-Run-ID": info.run_id})  # read to its end: stop reconnecting
    if info.last_seq < after:
        # A position the run never gave: following it would send nothing until the run got
        # there, then skip to it. An ended run is answered 204 above: nothing more will come.
        raise RequestError(400, beyond_message(info.last_seq), headers={"X-Run-ID": info.run_id})
    store, observers, settings = state.runs.store, state.observers, state.settings
    record = None if observers is None else observers.stream(info.prefix, info.function, rid, info.run_id)
    followed = tail(store, info.run_id, after, record, outage=settings.store_outage)
    return stream_response(
        followed, req, settings, rid, CancelToken(), run_id=info.run_id, record=record
    )  # fmt: skip


def _follow_later(
    state: State,
    run_id: str,
    after: int,
    req: Request,
    rid: str,
    admit: Callable[[RunInfo | None], bool],
) -> Response:
    if not wants_stream(req.environ.get("HTTP_ACCEPT"), req):
        raise StoreUnavailable()
    settings = state.settings
    followed = tail(state.runs.store, run_id, after, outage=settings.store_outage, admit=admit)
    return stream_response(followed, req, settings, rid, CancelToken(), run_id=run_id)


def run_view(run_id: str, functions: Mapping[str, RegisteredFunction], prefix: str = "") -> Response:
    """``GET`` (follow) or ``DELETE`` (cancel) ``{prefix}/runs/<run_id>``; ``OPTIONS`` 204."""
    state: State = current_app.extensions[EXTENSION_KEY]
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    rid = request_id(req.environ.get("HTTP_X_REQUEST_ID"))
    try:
        if req.method == "OPTIONS":
            return options_response(RUNS_ALLOW, rid)
        if req.method not in ("GET", "DELETE"):
            raise RequestError(405, "this endpoint accepts GET or DELETE only", headers={"Allow": RUNS_ALLOW})
        try:
            info = state.runs.store.get(run_id) if is_run_id(run_id) else None
        except StoreUnavailable:
            if req.method != "GET":
                raise
            return _follow_unseen(state, run_id, functions, prefix, req, rid)
        registered = functions.get(info.function) if info is not None and info.prefix == prefix else None
        if registered is None or not registered.public:
            # Before anything about the run is told: without a valid token every run is a 401.
            authenticate(state.auth, req.environ.get("HTTP_AUTHORIZATION"), rid)
        if registered is None or not _reachable(info, None, prefix):
            raise RequestError(404, "no such run")
        assert info is not None
        if req.method == "DELETE":
            state.runs.cancel(run_id)
            return no_content(rid, {"X-Run-ID": run_id})
        return _follow(state, info, _position(req, run_id), req, rid)
    except RequestError as exc:
        return error_response(exc, rid)


def _position(req: Request, run_id: str) -> int:
    position = req.environ.get("HTTP_LAST_EVENT_ID") or req.args.get("last_event_id")
    if position is None:
        return 0
    parsed = parse_position(position, run_id)
    if parsed is None:
        raise RequestError(400, "last_event_id must be a seq number or an event id of this run")
    return parsed


def _follow_unseen(
    state: State,
    run_id: str,
    functions: Mapping[str, RegisteredFunction],
    prefix: str,
    req: Request,
    rid: str,
) -> Response:
    """``GET /runs/<run_id>`` while the store is away: which function the run belongs to is not
    known yet, so a token is needed whenever auth is on (a public function's run included)."""
    authenticate(state.auth, req.environ.get("HTTP_AUTHORIZATION"), rid)
    after, owner = _position(req, run_id), jwt_subject()

    def admit(found: RunInfo | None) -> bool:
        registered = functions.get(found.function) if found is not None else None
        return registered is not None and _reachable(found, None, prefix, owner)

    return _follow_later(state, run_id, after, req, rid, admit)
