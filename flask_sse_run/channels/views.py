"""``GET {prefix}/channels/<name>`` and ``GET {prefix}/channels?channel=a&channel=b``.

Everything that can refuse a subscription is decided before the stream starts, as JSON: a bad
name or position (400), no bearer token where auth is on (401), the app's callback saying no
(403), a client that takes no stream (406), a store that cannot open the channel (503). A
browser's reconnect (``Last-Event-ID``) is the exception to the last: ``EventSource`` gives up
for good on any status but 200, so it gets a stream that waits for the store (as a run's
reconnect does), with keep-alive pings, and ends with an ``error`` event if the store stays away
longer than ``SSE_RUN_STORE_OUTAGE``.

Who may read a channel: with a callback registered (``@sse.channel_auth``) it decides, given the
channel's name and the request's identity (the JWT's ``sub``; ``None`` for a static token or
with auth off); without one, anyone with auth off, and any authenticated caller with it on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Request, Response, current_app, request

from ..auth import authenticate, jwt_subject
from ..cancellation import CancelToken
from ..errors import RequestError
from ..negotiation import STREAM, request_id, wants_stream
from ..registry import EXTENSION_KEY
from ..responses import error_response, options_response, stream_response
from ..runs.store import StoreUnavailable
from .names import MAX_CHANNELS, MAX_NAME, is_channel_name, parse_position
from .stream import ChannelStream, open_feeds

if TYPE_CHECKING:
    from ..registry import State

__all__ = ["CHANNELS_ALLOW", "ChannelAuthorizer", "channels_view"]

#: The methods the channel URLs answer.
CHANNELS_ALLOW = "GET, OPTIONS"
#: ``(channel, subject) -> may read it``; runs in the request's context.
ChannelAuthorizer = Callable[[str, "str | None"], bool]


def _names(name: str | None, req: Request) -> list[str]:
    asked = req.args.getlist("channel")
    if name is not None and asked:
        raise RequestError(400, "name the channels in the path or in ?channel=, not both")
    names = [name] if name is not None else asked
    if not names:
        raise RequestError(400, "name a channel: /channels/<name>, or ?channel=<name> (repeated for several)")
    if len(names) > MAX_CHANNELS:
        raise RequestError(400, f"a stream follows at most {MAX_CHANNELS} channels")
    for index, each in enumerate(names, 1):
        if not is_channel_name(each):
            where = "the channel's name" if len(names) == 1 else f"channel #{index}'s name"
            raise RequestError(400, f"{where} must be 1 to {MAX_NAME} letters, digits or any of _ . : @ -")
    if len(set(names)) != len(names):
        raise RequestError(400, "a channel is named twice")
    return names


def _authorizers(state: State) -> list[ChannelAuthorizer]:
    """The callbacks of every instance on the app: its channels are the app's, served under
    each instance's prefix, so each callback has its say at every one of them."""
    found: list[ChannelAuthorizer] = []
    for mount in state.mounts:
        authorizer = mount.extension.channel_authorizer
        if authorizer is not None and authorizer not in found:
            found.append(authorizer)
    return found


def _authorize(state: State, names: list[str], rid: str) -> None:
    authenticate(state.auth, request.environ.get("HTTP_AUTHORIZATION"), rid)
    authorizers = _authorizers(state)
    if not authorizers:
        return
    subject = jwt_subject()
    for index, name in enumerate(names, 1):
        if not all(authorizer(name, subject) for authorizer in authorizers):
            where = "this channel" if len(names) == 1 else f"channel #{index} of the request"
            raise RequestError(403, f"not allowed to read {where}")


def _positions(req: Request) -> dict[str, int]:
    text = req.environ.get("HTTP_LAST_EVENT_ID") or req.args.get("last_event_id")
    if not text:
        return {}
    parsed = parse_position(text)
    if parsed is None:
        raise RequestError(400, "Last-Event-ID (or last_event_id) is not an id this channel stream sent")
    return parsed


def channels_view(name: str | None, prefix: str = "") -> Response:
    """Stream the channels the request names; see the module docstring."""
    state: State = current_app.extensions[EXTENSION_KEY]
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    rid = request_id(req.environ.get("HTTP_X_REQUEST_ID"))
    try:
        if req.method == "OPTIONS":
            return options_response(CHANNELS_ALLOW, rid)
        if req.method != "GET":
            raise RequestError(405, "this endpoint accepts GET only", headers={"Allow": CHANNELS_ALLOW})
        names = _names(name, req)
        _authorize(state, names, rid)
        if not wants_stream(req.environ.get("HTTP_ACCEPT"), req):
            raise RequestError(406, f"a channel is read as {STREAM}")
        given = _positions(req)
        return _subscribe(state, names, given, req, rid, prefix)
    except RequestError as exc:
        return error_response(exc, rid)


def _subscribe(
    state: State, names: list[str], given: dict[str, int], req: Request, rid: str, prefix: str
) -> Response:
    hub = state.runs.channels
    try:
        opened = open_feeds(hub, names, given)
    except StoreUnavailable:
        if not req.environ.get("HTTP_LAST_EVENT_ID"):
            raise
        opened = None  # a browser's reconnect: 200 and wait for the store, as runs do
    if state.runs.store.pending():
        state.runs.ensure_janitor()  # the in-process store forgets the channel once idle
    observers = state.observers
    record = None if observers is None else observers.stream(prefix, "channels", rid)
    outage = state.settings.store_outage
    if opened is None:
        body = ChannelStream.when_store_answers(hub, names, given, record, outage=outage)
    else:
        feeds, positions, epochs = opened
        body = ChannelStream(hub, feeds, positions, record, outage=outage, epochs=epochs)
    try:
        return stream_response(body, req, state.settings, rid, CancelToken(), stored=True, record=record)
    except BaseException:
        body.close()
        raise
