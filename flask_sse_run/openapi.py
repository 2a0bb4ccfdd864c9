"""``GET {url_prefix}/openapi.json``: an OpenAPI 3.1 document built from the registered functions.

Each function is a ``POST {url_prefix}/{name}`` operation (operationId ``{name}``), a ``GET``
one (``{name}_get``), or both, as it is served. The POST body is pydantic's JSON Schema of the
signature (the model :func:`~flask_sse_run.binding.inspect_function` built), and GET has one
query parameter per property of that same schema, so the document cannot drift from what the
server validates. All schemas are generated in one pass
(:func:`pydantic.json_schema.models_json_schema`), which gives two different models of the same
name two different component names; pydantic's ``$defs`` become ``components/schemas``.

A resumable function (``resumable=True``, or ``SSE_RUN_RESUMABLE`` and not ``False``) also
documents ``Last-Event-ID`` and ``Prefer: respond-async``, the ``202`` and ``204`` answers and
``X-Run-ID``; an instance that may hold runs documents ``{url_prefix}/runs/{run_id}`` (``GET``:
``runs_get``, ``DELETE``: ``runs_delete``, qualified by the prefix like every operationId).
Every instance also documents its channels (:mod:`flask_sse_run.channels`), which it always
serves: ``GET {url_prefix}/channels/{channel}`` (``channels_channel_get``) and ``GET
{url_prefix}/channels?channel=a&channel=b`` (``channels_get``), with ``Last-Event-ID`` or
``?last_event_id=``, the channel stream and its refusals (``403`` where a ``channel_auth``
callback is registered). OperationIds are unique: one that two paths would share gets ``_2``,
``_3`` ... on the later one.

A prefix is a Werkzeug rule's (a blueprint's ``/<tenant>`` and ``<int:org>`` included): its
variables become OpenAPI path templates (``/{tenant}``), each documented as a path parameter of
every operation below it. A blueprint's subdomain is not in the paths (OpenAPI would need a
server per host).

Descriptions come from the function's docstring (first line: ``summary``; all of it:
``description``) and, per parameter, from ``Field(description=...)`` or else from the docstring
(:func:`~flask_sse_run.docstrings.parameter_docs`).

The document is built per request (it is small, and functions may be registered after
``init_app``) and is public even when auth is on: it describes the API, it grants nothing.
"""

from __future__ import annotations

import collections.abc
import copy
import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, request
from pydantic.json_schema import models_json_schema

from .channels.names import MAX_CHANNELS, MAX_NAME
from .docstrings import parameter_docs
from .errors import RequestError
from .negotiation import request_id
from .registry import EXTENSION_KEY
from .responses import error_response, options_response
from .runs.tail import MISSED_EVENT
from .views import MAX_JSON_ITEMS

if TYPE_CHECKING:
    from .config import Settings
    from .registry import RegisteredFunction, State

__all__ = ["CHANNELS_PATH", "CHANNEL_PATH", "OPENAPI_PATH", "RUNS_PATH", "build_document", "openapi_view"]

OPENAPI_PATH = "/openapi.json"
#: The path of a run, below an instance's url_prefix, as the document writes it.
RUNS_PATH = "/runs/{run_id}"
#: The paths of channels, below an instance's url_prefix: several (``?channel=``), and one.
CHANNELS_PATH = "/channels"
CHANNEL_PATH = "/channels/{channel}"
_ALLOW = "GET, HEAD, OPTIONS"
_REF = "#/components/schemas/{model}"
# Our own component names hold a dot: pydantic's generated names are identifiers joined by
# "__", so these cannot collide with a user's model.
_ERROR = "SSERun.Error"
_VALIDATION_ERROR = "SSERun.ValidationError"
_PROBLEM = "SSERun.Problem"
_RESULT = "SSERun.Result"
_EVENT = "SSERun.Event"
_RUN_STARTED = "SSERun.RunStarted"
_SECURITY = "bearerAuth"
# What flask_sse_run.runs.ids accepts: a run id (32 hex digits), a seq, an event id.
_RUN_ID_PATTERN = "^[0-9a-f]{32}$"
_SEQ = "(?:0|[1-9][0-9]{0,17})"
_EVENT_ID_PATTERN = f"^[0-9a-f]{{32}}:{_SEQ}$"
_POSITION_PATTERN = f"^(?:[0-9a-f]{{32}}:)?{_SEQ}$"
# What flask_sse_run.channels.names accepts: a channel's name, a channel stream's event id.
_CHANNEL_NAME = f"[A-Za-z0-9_.:@-]{{1,{MAX_NAME}}}"
_CHANNEL_NAME_PATTERN = f"^{_CHANNEL_NAME}$"
_CHANNEL_POSITION_PATTERN = f"^{_CHANNEL_NAME}:{_SEQ}(?:,{_CHANNEL_NAME}:{_SEQ})*$"
# A variable of a Werkzeug rule: <name>, <converter:name>, <converter(arguments):name>.
_RULE_VARIABLE = re.compile(
    r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\((?P<arguments>.*?)\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>"
)

_STREAM_DESCRIPTION = """\
A Server-Sent Events stream (WHATWG HTML, "server-sent events"); the schema describes one event. \
Each value the function yields is one event: a string is sent as it is (one `data:` line per \
line of text), any other value as compact JSON (`data: {"a":1}`). If the function raises, the \
stream ends with one `event: error` whose data is `{"type": ..., "message": ...}`. Lines \
starting with `:` are keep-alive comments."""

_RUN_STREAM_DESCRIPTION = f"""\
 The stream is a resumable run (`X-Run-ID`): every event has `id: <run_id>:<seq>`, seq counting \
from 1, and a client that lost the connection reconnects with `Last-Event-ID` (as `EventSource` \
does by itself) to get the events after it; the run goes on for a while without a client. When \
a reconnect asks for events the buffer no longer holds, one `event: {MISSED_EVENT}` with data \
`{{"{MISSED_EVENT}": N}}` says how many were dropped, then the held events follow."""

_CHANNEL_STREAM_DESCRIPTION = f"""\
A Server-Sent Events stream of the channels the request names, from the moment of the request \
(or after the position in `Last-Event-ID`), live: it never ends by itself. It starts with a \
block that has only an `id:` line (it sets `EventSource.lastEventId` and dispatches no event). \
Every event's id holds the position of each channel of the stream, in the order of the \
request: `<channel>:<seq>` for one channel, `news:12,user:42:7` for two (the seq follows the \
last `:`), seqs counting from 1 per channel; a client that reconnects with it (as \
`EventSource` does by itself) gets every event after it. `data` is what was published: text as \
it is, anything else as compact JSON; `event` its name, if it was given one. When a reconnect \
asks for events older than a channel's history, one `event: {MISSED_EVENT}` with data \
`{{"channel": "<channel>", "{MISSED_EVENT}": N}}` says how many are gone, then the held events \
follow. A store that stops answering for longer than `SSE_RUN_STORE_OUTAGE` ends the stream with \
one `event: error` whose data is `{{"type": "StoreUnavailable", "message": ...}}`. Lines starting \
with `:` are keep-alive comments."""

_ERRORS: dict[str, tuple[str, str]] = {
    "400": (
        "The body is not a JSON object (invalid JSON or UTF-8, NaN/Infinity, a number out of "
        "range, a duplicate key, nesting deeper than 64).",
        _ERROR,
    ),
    "401": ("No bearer token, or one that was refused; see `WWW-Authenticate`.", _ERROR),
    "403": ("The app's `channel_auth` callback refused one of the channels.", _ERROR),
    "404": (
        "No function of that name (or, under a non-empty url_prefix, any other path below it).",
        _ERROR,
    ),
    "405": ("A method other than those documented (or `OPTIONS`, answered 204); see `Allow`.", _ERROR),
    "406": (
        "The `Accept` header allows neither `text/event-stream` nor `application/json`; or it allows "
        f"only `application/json` and the function yielded more than {MAX_JSON_ITEMS} items.",
        _ERROR,
    ),
    "408": ("The request body did not arrive within `SSE_RUN_BODY_TIMEOUT` seconds.", _ERROR),
    "413": ("The body is larger than `SSE_RUN_MAX_BODY` bytes.", _ERROR),
    "415": ("A non-empty body whose `Content-Type` is not JSON.", _ERROR),
    "422": ("Missing, unknown or mistyped parameters; `detail` lists every problem.", _VALIDATION_ERROR),
    "500": ("The function raised before returning its first value.", _ERROR),
    "503": (
        "The function cannot serve now (a model still loading, a full queue); `Retry-After` may "
        "say when to try again.",
        _ERROR,
    ),
}
_BAD_LAST_EVENT_ID = "A `Last-Event-ID` that is not an event id of this server (`<run_id>:<seq>`)."
# What a resumable function's answers say on top of the plain ones.
_RESUMABLE_ERRORS = {
    "400": f"Or: {_BAD_LAST_EVENT_ID[0].lower()}{_BAD_LAST_EVENT_ID[1:]}",
    "406": "Or a reconnect (`Last-Event-ID`) whose `Accept` does not allow `text/event-stream`.",
    "503": "Or this worker holds `SSE_RUN_MAX_RUNS` runs, or its runs `SSE_RUN_MAX_BYTES` bytes of "
    "events, already (`Retry-After` says when to retry).",
}
_POST_ERRORS = ("400", "406", "408", "413", "415", "422", "500", "503")
# A GET reads no body: no 400 (but for a bad Last-Event-ID), 408, 413 or 415.
_GET_ERRORS = ("406", "422", "500", "503")
_NO_RUN = (
    "No such run: never started, expired (`SSE_RUN_RESUME_TTL` after its end), started under "
    "another url_prefix, or by another JWT subject."
)


def _resumable(registered: RegisteredFunction, settings: Settings) -> bool:
    """Whether ``registered``'s streams are resumable runs (as documented)."""
    wanted = settings.resumable if registered.resumable is None else registered.resumable
    # A run is started only from an iterator: a function that returns a value has none.
    return wanted and _may_stream(registered.func)


def build_document(
    functions: Mapping[str, RegisteredFunction],
    settings: Settings,
    *,
    url_prefix: str = "",
    title: str = "flask-sse-run",
    server_url: str = "/",
    more: Sequence[tuple[str, Mapping[str, RegisteredFunction]]] = (),
    channel_auth: bool = False,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``functions`` served under ``url_prefix``.

    ``more`` adds other instances' functions (or the same functions mounted again), as
    ``(url_prefix, functions)`` pairs; a prefix may hold a Werkzeug rule's variables. Where two
    give one path, the first is documented.
    ``settings`` decides the security scheme (when auth is on), the documented end event, and
    (``SSE_RUN_RESUMABLE``) which functions are resumable and whose ``/runs`` paths appear.
    ``channel_auth``: a ``channel_auth`` callback decides who reads channels (their ``403``).
    """
    instances = [(*_path_template(prefix), registry) for prefix, registry in [(url_prefix, functions), *more]]
    found: dict[str, tuple[str, RegisteredFunction, list[dict[str, Any]]]] = {}
    for prefix, path_parameters, registry in instances:
        for name, registered in registry.items():
            found.setdefault(f"{prefix}/{name}", (name, registered, path_parameters))
    operations = sorted(found.items())
    refs, defs = models_json_schema(
        [(registered.binder.model, "validation") for _, (_, registered, _) in operations],
        by_alias=True,
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    paths: dict[str, Any] = {}
    for path, (name, registered, path_parameters) in operations:
        ref = refs[(registered.binder.model, "validation")]["$ref"]
        body_schema = schemas[ref.rsplit("/", 1)[1]]
        _describe_parameters(body_schema, parameter_docs(inspect.getdoc(registered.func)))
        # The docstring is the operation's description; the body schema need not repeat it.
        body_schema.pop("description", None)
        # Unique across instances: /run and /falcon/run are "run" and "falcon_run".
        base_id = _qualified(path)
        item: dict[str, Any] = {}
        runs_path = path.rsplit("/", 1)[0] + RUNS_PATH
        if "GET" in registered.methods:
            query = [*path_parameters, *_query_parameters(body_schema)]
            item["get"] = _operation(f"{base_id}_get", name, registered, settings, runs_path, query=query)
        if "POST" in registered.methods:
            body = (ref, body_schema)
            item["post"] = _operation(
                base_id, name, registered, settings, runs_path, body=body, query=path_parameters
            )
        paths[path] = item
    for prefix, path_parameters, registry in instances:
        if settings.resumable or any(_resumable(r, settings) for r in registry.values()):
            paths.setdefault(f"{prefix}{RUNS_PATH}", _runs_path(prefix, registry, settings, path_parameters))
        for path, several in ((CHANNELS_PATH, True), (CHANNEL_PATH, False)):
            item = _channels_path(prefix, several, settings, channel_auth, path_parameters)
            paths.setdefault(f"{prefix}{path}", item)
    paths = dict(sorted(paths.items()))
    _make_operation_ids_unique(paths)
    schemas.update(_own_schemas())
    components: dict[str, Any] = {
        "schemas": schemas,
        "responses": {code: _error_response(code) for code in ("404", "405")},
        "headers": {
            "X-Request-ID": {
                "description": "The request's id: the client's own if it was sane, else a new one.",
                "schema": {"type": "string"},
            },
            "X-Run-ID": {
                "description": "The run this answer follows (on a stream, only when it is a run's).",
                "schema": {"type": "string", "pattern": _RUN_ID_PATTERN},
            },
        },
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": settings.openapi_version},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": components,
    }
    if settings.auth_enabled:
        scheme: dict[str, Any] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A static token from SSE_RUN_AUTH_TOKENS or a JWT signed with SSE_RUN_JWT_KEY.",
        }
        if settings.auth_tokens is None:
            scheme["bearerFormat"] = "JWT"
        components["securitySchemes"] = {_SECURITY: scheme}
        document["security"] = [{_SECURITY: []}]
    return document


def _path_template(prefix: str) -> tuple[str, list[dict[str, Any]]]:
    """A rule's prefix as an OpenAPI path template (``/<int:org>/x`` is ``/{org}/x``), and a
    path parameter for each of its variables, typed as its converter matches."""
    parameters: list[dict[str, Any]] = []

    def template(match: re.Match[str]) -> str:
        converter, arguments = match["converter"] or "default", match["arguments"] or ""
        schema: dict[str, Any] = {"type": "string"}
        if converter in ("int", "float"):
            schema = {"type": "integer" if converter == "int" else "number"}
            if "signed=True" not in arguments.replace(" ", ""):
                schema["minimum"] = 0
        elif converter == "uuid":
            schema["format"] = "uuid"
        parameters.append({"name": match["name"], "in": "path", "required": True, "schema": schema})
        return f"{{{match['name']}}}"

    return _RULE_VARIABLE.sub(template, prefix), parameters


def _qualified(path: str) -> str:
    """An operationId's start for ``path``: ``falcon/run`` is ``falcon_run``, ``/{org}/run``
    ``org_run``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", path.strip("/").replace("{", "").replace("}", "").replace("/", "_"))


def _make_operation_ids_unique(paths: dict[str, Any]) -> None:
    # A function named "run_get" next to a GET-able "run", or "a-b" next to "a_b": the later
    # one (in path order) gets a suffix.
    seen: set[str] = set()
    for item in paths.values():
        for operation in item.values():
            wanted = candidate = operation["operationId"]
            suffix = 1
            while candidate in seen:
                suffix += 1
                candidate = f"{wanted}_{suffix}"
            operation["operationId"] = candidate
            seen.add(candidate)


_REQUEST_ID_PARAMETER = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Echoed back if it is 1-128 characters of `A-Za-z0-9._:-`; "
    "otherwise the server picks a new id.",
    "schema": {"type": "string"},
}


def _operation(
    operation_id: str,
    name: str,
    registered: RegisteredFunction,
    settings: Settings,
    runs_path: str,
    *,
    body: tuple[str, dict[str, Any]] | None = None,
    query: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A function's POST (``body``: its schema's ref and the schema) or GET operation;
    ``query``: its parameters other than headers (the prefix's path parameters, then for GET
    the query's); ``runs_path`` is where its runs are followed (for a resumable function's 202)."""
    doc = inspect.getdoc(registered.func) or ""
    runs = _resumable(registered, settings)
    success: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(model=_RESULT)}}}
    if _may_stream(registered.func):
        stream = _STREAM_DESCRIPTION
        if settings.end_event is not None:
            stream += f" A stream that finishes normally ends with an empty `event: {settings.end_event}`."
        if runs:
            stream += _RUN_STREAM_DESCRIPTION
        # OpenAPI 3.1 has no word for a stream's items; like 3.2's itemSchema (and as
        # schemathesis reads it), the schema of text/event-stream describes one event.
        success = {
            "text/event-stream": {"schema": {"$ref": _REF.format(model=_EVENT), "description": stream}},
            **success,
        }
    ok: dict[str, Any] = {
        "description": "The function's output: a stream of events, or one JSON document for "
        "clients that accept only `application/json` (and for functions that return a value).",
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
        "content": success,
    }
    responses: dict[str, Any] = {"200": ok}
    parameters = [*(query or []), dict(_REQUEST_ID_PARAMETER)]
    codes = [
        code for code in (_POST_ERRORS if body else _GET_ERRORS) if code != "408" or settings.body_timeout
    ]
    if runs:
        ok["headers"]["X-Run-ID"] = {"$ref": "#/components/headers/X-Run-ID"}
        ok["description"] += " A stream of a resumable function is a run: `X-Run-ID` names it."
        parameters += [_last_event_id_parameter(body is None), _PREFER_PARAMETER]
        responses["202"] = _run_started_response(runs_path)
        responses["204"] = _no_content_response(
            "A reconnect (`Last-Event-ID`) with nothing left to send: the run has ended and every "
            "event after that id was sent, or the run is unknown, expired or not this client's. "
            "`EventSource` stops reconnecting."
        )
        codes.append("400")
    if settings.auth_enabled and not registered.public:
        codes.append("401")
    for code in sorted(set(codes)):
        if not runs or code not in _RESUMABLE_ERRORS:
            responses[code] = _error_response(code)
        elif code == "400" and body is None:
            responses[code] = _error_response(code, _BAD_LAST_EVENT_ID)
        else:
            responses[code] = _error_response(code, f"{_ERRORS[code][0]} {_RESUMABLE_ERRORS[code]}")
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": doc.splitlines()[0] if doc else f"Run {name}",
    }
    if body is not None:
        ref, body_schema = body
        operation["requestBody"] = {
            # With no required parameter an empty body is a valid call.
            "required": bool(body_schema.get("required")),
            "content": {"application/json": {"schema": {"$ref": ref}}},
        }
    operation["parameters"] = parameters
    operation["responses"] = responses
    if doc:
        operation["description"] = doc
    if settings.auth_enabled and registered.public:
        operation["security"] = []
    return operation


def _last_event_id_parameter(get: bool) -> dict[str, Any]:
    ignored = "query string" if get else "body"
    return {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "Reconnect to a run: the `id` of the last event received "
        f"(`<run_id>:<seq>`, as `EventSource` sends it). The {ignored} is then ignored and the "
        "events after that one follow (204 if there are none).",
        "schema": {"type": "string", "pattern": _EVENT_ID_PATTERN},
    }


_PREFER_PARAMETER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "`respond-async` (RFC 7240): start the run and answer 202 at once, with its "
    "URL, instead of streaming it; other preferences are ignored.",
    "schema": {"type": "string"},
    "examples": {"async": {"summary": "Start a run, follow it later", "value": "respond-async"}},
}


def _run_started_response(runs_path: str) -> dict[str, Any]:
    # A JSON pointer to the runs path's operations: "/" is "~1" in it ("~" cannot occur).
    pointer = "#/paths/" + runs_path.replace("/", "~1")
    run_id = {"run_id": "$response.body#/run_id"}
    return {
        "description": "`Prefer: respond-async`: the run started and goes on without a client; "
        "follow it at `Location` (`GET`), cancel it there (`DELETE`).",
        "headers": {
            "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
            "X-Run-ID": {"$ref": "#/components/headers/X-Run-ID"},
            "Location": {
                "description": "The run's URL: `{url_prefix}/runs/{run_id}`.",
                "required": True,
                "schema": {"type": "string"},
            },
            "Preference-Applied": {
                "description": "`respond-async`.",
                "required": True,
                "schema": {"type": "string", "const": "respond-async"},
            },
        },
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=_RUN_STARTED)}}},
        "links": {
            "follow": {"operationRef": f"{pointer}/get", "parameters": run_id},
            "cancel": {"operationRef": f"{pointer}/delete", "parameters": run_id},
        },
    }


def _no_content_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {
            "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
            "X-Run-ID": {"$ref": "#/components/headers/X-Run-ID"},
        },
    }


def _runs_path(
    prefix: str,
    registry: Mapping[str, RegisteredFunction],
    settings: Settings,
    path_parameters: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """``{prefix}/runs/{run_id}``: follow a run (``GET``) or cancel it (``DELETE``)."""
    qualifier = _qualified(prefix)
    base_id = f"{qualifier}_runs" if qualifier else "runs"
    run_id = {
        "name": "run_id",
        "in": "path",
        "required": True,
        "description": "The run's id, from `X-Run-ID` or a 202's body.",
        "schema": {"type": "string", "pattern": _RUN_ID_PATTERN},
    }
    position = "A seq number, or an event id of this run (`<run_id>:<seq>`)"
    stream = _STREAM_DESCRIPTION + _RUN_STREAM_DESCRIPTION
    if settings.end_event is not None:
        stream += f" A run that finished normally ends with an empty `event: {settings.end_event}`."
    gone = _error_response("404", _NO_RUN)
    get_responses: dict[str, Any] = {
        "200": {
            "description": "The run's events after the position (all of them without one), live "
            "until the run ends.",
            "headers": {
                "X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"},
                "X-Run-ID": {"$ref": "#/components/headers/X-Run-ID"},
            },
            "content": {
                "text/event-stream": {"schema": {"$ref": _REF.format(model=_EVENT), "description": stream}}
            },
        },
        "204": _no_content_response(
            "The run has ended and every event after the position was sent: nothing is left."
        ),
        "400": _error_response(
            "400", "`Last-Event-ID` or `last_event_id` is neither a seq number nor an event id of this run."
        ),
        "404": gone,
        "406": _error_response("406", "The `Accept` header does not allow `text/event-stream`."),
    }
    delete_responses: dict[str, Any] = {
        "204": _no_content_response("Cancelled: the function is stopped as if its client had left."),
        "404": gone,
    }
    security: list[dict[str, list[str]]] | None = None
    if settings.auth_enabled:
        denied = _error_response("401")
        get_responses["401"] = delete_responses["401"] = denied
        if any(r.public and _resumable(r, settings) for r in registry.values()):
            # A public function's run is reached without a token, any other with one.
            security = [{_SECURITY: []}, {}]
    get = {
        "operationId": f"{base_id}_get",
        "summary": "Follow a run",
        "description": "Stream a resumable run's events after a position (the header wins "
        "over the query), then the live ones until it ends. `EventSource` can read it.",
        "parameters": [
            *path_parameters,
            run_id,
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": f"{position}: follow from after that event.",
                "schema": {"type": "string", "pattern": _POSITION_PATTERN},
            },
            {
                "name": "last_event_id",
                "in": "query",
                "required": False,
                "description": f"{position}: follow from after that event (for clients that "
                "cannot set headers).",
                "schema": {"type": "string", "pattern": _POSITION_PATTERN},
            },
            dict(_REQUEST_ID_PARAMETER),
        ],
        "responses": dict(sorted(get_responses.items())),
    }
    delete = {
        "operationId": f"{base_id}_delete",
        "summary": "Cancel a run",
        "description": "Stop the run's function (its events stay readable until they expire).",
        "parameters": [*path_parameters, run_id, dict(_REQUEST_ID_PARAMETER)],
        "responses": dict(sorted(delete_responses.items())),
    }
    if security is not None:
        get["security"] = delete["security"] = security
    return {"get": get, "delete": delete}


def _channels_path(
    prefix: str,
    several: bool,
    settings: Settings,
    channel_auth: bool,
    path_parameters: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """``{prefix}/channels?channel=...`` (``several``) or ``{prefix}/channels/{channel}``:
    follow channels (``GET``)."""
    name = {"type": "string", "pattern": _CHANNEL_NAME_PATTERN}
    if several:
        channels: dict[str, Any] = {
            "name": "channel",
            "in": "query",
            "required": True,
            "description": f"The channels to follow, 1 to {MAX_CHANNELS}, each once: "
            "`?channel=news&channel=user:42`. Event ids name them in this order.",
            "schema": {"type": "array", "items": name, "minItems": 1, "maxItems": MAX_CHANNELS},
            "style": "form",
            "explode": True,
        }
        bad = (
            f"No channel, more than {MAX_CHANNELS}, one named twice, or a name that is not 1 to "
            f"{MAX_NAME} letters, digits or `_ . : @ -`"
        )
    else:
        channels = {
            "name": "channel",
            "in": "path",
            "required": True,
            "description": f"The channel's name: 1 to {MAX_NAME} letters, digits or `_ . : @ -` "
            "(`news`, `user:42`).",
            "schema": name,
        }
        bad = (
            f"A name that is not 1 to {MAX_NAME} letters, digits or `_ . : @ -`, or channels named "
            "in `?channel=` too"
        )
    position = "The id of the last event received (`<channel>:<seq>[,<channel>:<seq>...]`)"
    responses: dict[str, Any] = {
        "200": {
            "description": "The channels' events, live, for as long as the client reads.",
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
            "content": {
                "text/event-stream": {
                    "schema": {"$ref": _REF.format(model=_EVENT), "description": _CHANNEL_STREAM_DESCRIPTION}
                }
            },
        },
        "400": _error_response(
            "400", f"{bad}; or a `Last-Event-ID` (or `last_event_id`) that is not a channel stream's id."
        ),
        "406": _error_response(
            "406", "The `Accept` header does not allow `text/event-stream` (a channel is only a stream)."
        ),
        "503": _error_response(
            "503",
            "The run store cannot open a channel: Redis does not answer, or this worker's in-process "
            "store holds `SSE_RUN_MAX_RUNS` runs and channels already.",
        ),
    }
    if settings.auth_enabled:
        responses["401"] = _error_response("401")
    if channel_auth:
        responses["403"] = _error_response("403")
    subject = "several channels in one stream" if several else "a channel"
    qualifier = _qualified(f"{prefix}{CHANNELS_PATH if several else CHANNEL_PATH}")
    get = {
        "operationId": f"{qualifier}_get",
        "summary": "Follow several channels" if several else "Follow a channel",
        "description": f"Stream {subject}: every event published on it from now on (`sse.publish` "
        "in the app, `flask sse publish` in a shell), or after the position in `Last-Event-ID` (the "
        "header wins over the query), then live. `EventSource` can read it. Any other method is "
        "answered 405 (`Allow: GET, OPTIONS`).",
        "parameters": [
            *path_parameters,
            channels,
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": f"{position}: resume every channel after it, as `EventSource` does "
                "when it reconnects.",
                "schema": {"type": "string", "pattern": _CHANNEL_POSITION_PATTERN},
            },
            {
                "name": "last_event_id",
                "in": "query",
                "required": False,
                "description": f"{position}: resume after it (for clients that cannot set headers).",
                "schema": {"type": "string", "pattern": _CHANNEL_POSITION_PATTERN},
            },
            dict(_REQUEST_ID_PARAMETER),
        ],
        "responses": dict(sorted(responses.items())),
    }
    return {"get": get}


def _query_parameters(body_schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One query parameter per property of the body schema (the binder reads them by the same
    names: a repeated key, or any key of a list parameter, is a list). Registration refused GET
    for a function with a parameter a query string cannot carry."""
    required = set(body_schema.get("required", ()))
    parameters = []
    for param, prop in body_schema.get("properties", {}).items():
        schema = _query_schema(prop)
        description = schema.pop("description", None)
        parameter: dict[str, Any] = {"name": param, "in": "query", "required": param in required}
        if description:
            parameter["description"] = description
        parameter["schema"] = schema
        if _is_array(schema):
            # ?tags=a&tags=b: what Werkzeug's getlist and the binder read.
            parameter.update(style="form", explode=True)
        parameters.append(parameter)
    return parameters


def _query_schema(prop: Mapping[str, Any]) -> dict[str, Any]:
    # A query string cannot say null: an absent key takes the default instead.
    schema = copy.deepcopy(dict(prop))
    options = [s for s in schema.get("anyOf", ()) if s != {"type": "null"}]
    if "anyOf" in schema and len(options) < len(schema["anyOf"]):
        del schema["anyOf"]
        if len(options) == 1:
            schema.update(options[0])
        elif options:
            schema["anyOf"] = options
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    return schema


def _is_array(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "array" or any(_is_array(s) for s in schema.get("anyOf", ()))


def _error_response(code: str, description: str | None = None) -> dict[str, Any]:
    default, schema = _ERRORS[code]
    headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if code == "401":
        headers["WWW-Authenticate"] = {
            "description": '`Bearer`, with `error="invalid_token"` when a token was refused.',
            "schema": {"type": "string"},
        }
    elif code == "405":
        headers["Allow"] = {"description": "The methods the URL accepts.", "schema": {"type": "string"}}
    elif code == "503":
        headers["Retry-After"] = {
            "description": "Seconds to wait before trying again.",
            "schema": {"type": "string"},
        }
    return {
        "description": description or default,
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=schema)}}},
    }


def _own_schemas() -> dict[str, Any]:
    problem = {
        "type": "object",
        "description": "One problem with the parameters; the value sent is never echoed.",
        "properties": {
            "loc": {
                "type": "array",
                "items": {"type": ["string", "integer"]},
                "description": "Where: the parameter's name, then keys or indexes inside it.",
            },
            "msg": {"type": "string"},
            "type": {"type": "string", "description": "A pydantic error type, e.g. `missing`."},
        },
        "required": ["loc", "msg", "type"],
    }
    return {
        _ERROR: {
            "type": "object",
            "properties": {"error": {"type": "string"}},
            "required": ["error"],
        },
        _PROBLEM: problem,
        _VALIDATION_ERROR: {
            "type": "object",
            "properties": {
                "error": {"type": "string", "const": "invalid parameters"},
                "detail": {"type": "array", "items": {"$ref": _REF.format(model=_PROBLEM)}},
            },
            "required": ["error", "detail"],
        },
        _EVENT: {
            "type": "object",
            "description": "One event, as a client's EventSource sees it.",
            "properties": {
                "data": {"type": "string", "description": "The yielded text, or compact JSON."},
                "event": {
                    "type": "string",
                    "description": "`message` for yielded values, `error` if the function raised, "
                    f"`{MISSED_EVENT}` (a resumable run's events were dropped before a reconnect read "
                    f'them; data `{{"{MISSED_EVENT}": N}}`; a channel\'s: `{{"channel": ..., '
                    f'"{MISSED_EVENT}": N}}`), or a name given with flask_sse_run.Event (or with '
                    "a channel's publish).",
                },
                "id": {
                    "type": "string",
                    "description": "In a resumable run: `<run_id>:<seq>`, seq counting from 1, what "
                    "`Last-Event-ID` resumes from; in a channel stream: `<channel>:<seq>` for each "
                    "channel, joined by `,`. Otherwise an id given with flask_sse_run.Event.",
                },
                "retry": {"type": "integer", "minimum": 0},
            },
            "required": ["data"],
        },
        _RUN_STARTED: {
            "type": "object",
            "description": "A run started with `Prefer: respond-async`.",
            "properties": {
                "run_id": {"type": "string", "pattern": _RUN_ID_PATTERN},
                "events": {"type": "string", "description": "The run's URL, as in `Location`."},
            },
            "required": ["run_id", "events"],
        },
        _RESULT: {
            "type": "object",
            "properties": {
                "run_id": {"type": "string", "description": "The request id."},
                "run_time_ms": {"type": "number", "minimum": 0},
                "result": {"description": "The return value, or a generator's items in a list."},
            },
            "required": ["run_id", "run_time_ms", "result"],
        },
    }


_ITERATOR_TYPES = {
    collections.abc.Iterator,
    collections.abc.Iterable,
    collections.abc.Generator,
}


def _may_stream(func: Callable[..., Any]) -> bool:
    """Whether ``func`` can return an iterator (a stream); when in doubt, yes."""
    if inspect.isgeneratorfunction(func):
        return True
    try:
        returns = typing.get_type_hints(func).get("return", Any)
    except Exception:  # an unresolvable return annotation says nothing
        return True
    origin = typing.get_origin(returns) or returns
    return returns is Any or origin in _ITERATOR_TYPES


def _describe_parameters(schema: dict[str, Any], docs: Mapping[str, str]) -> None:
    # A Field(description=...) wins over the docstring.
    for name, prop in schema.get("properties", {}).items():
        if name in docs and "description" not in prop:
            prop["description"] = docs[name]


def openapi_view() -> Response:
    """Serve the app's OpenAPI document (``GET``; ``OPTIONS`` gets 204, other methods 405)."""
    state: State = current_app.extensions[EXTENSION_KEY]
    if request.method not in ("GET", "HEAD"):
        rid = request_id(request.headers.get("X-Request-ID"))
        if request.method == "OPTIONS":
            return options_response(_ALLOW, rid)
        return error_response(
            RequestError(405, "this endpoint accepts GET only", headers={"Allow": _ALLOW}), rid
        )
    first, *others = state.mounts
    document = build_document(
        first.extension.functions,
        state.settings,
        url_prefix=first.url_prefix,
        more=[(other.url_prefix, other.extension.functions) for other in others],
        title=state.settings.openapi_title or current_app.name,
        server_url=request.script_root or "/",
        channel_auth=any(mount.extension.channel_authorizer is not None for mount in state.mounts),
    )
    return Response(json.dumps(document, ensure_ascii=False), mimetype="application/json")
