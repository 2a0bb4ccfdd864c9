"""``GET {url_prefix}/openapi.json``: an OpenAPI 3.1 document built from the registered functions.

Each function is one ``POST {url_prefix}/{name}`` operation. Its request body is pydantic's JSON
Schema of the signature (the model :func:`~flask_sse_run.binding.inspect_function` built), so the
document cannot drift from what the server validates. All bodies are generated in one pass
(:func:`pydantic.json_schema.models_json_schema`), which gives two different models of the same
name two different component names; pydantic's ``$defs`` become ``components/schemas``.

Descriptions come from the function's docstring (first line: ``summary``; all of it:
``description``) and, per parameter, from ``Field(description=...)`` or else from the docstring
(:func:`~flask_sse_run.docstrings.parameter_docs`).

The document is built per request (it is small, and functions may be registered after
``init_app``) and is public even when auth is on: it describes the API, it grants nothing.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, request
from pydantic.json_schema import models_json_schema

from .docstrings import parameter_docs
from .errors import RequestError
from .negotiation import request_id
from .responses import error_response, options_response
from .views import EXTENSION_KEY, MAX_JSON_ITEMS

if TYPE_CHECKING:
    from .config import Settings
    from .extension import RegisteredFunction, State

__all__ = ["OPENAPI_PATH", "build_document", "openapi_view"]

OPENAPI_PATH = "/openapi.json"
_ALLOW = "GET, HEAD, OPTIONS"
_REF = "#/components/schemas/{model}"
# Our own component names hold a dot: pydantic's generated names are identifiers joined by
# "__", so these cannot collide with a user's model.
_ERROR = "SSERun.Error"
_VALIDATION_ERROR = "SSERun.ValidationError"
_PROBLEM = "SSERun.Problem"
_RESULT = "SSERun.Result"
_EVENT = "SSERun.Event"
_SECURITY = "bearerAuth"

_STREAM_DESCRIPTION = """\
A Server-Sent Events stream (WHATWG HTML, "server-sent events"); the schema describes one event. \
Each value the function yields is one event: a string is sent as it is (one `data:` line per \
line of text), any other value as compact JSON (`data: {"a":1}`). If the function raises, the \
stream ends with one `event: error` whose data is `{"type": ..., "message": ...}`. Lines \
starting with `:` are keep-alive comments."""

_ERRORS: dict[str, tuple[str, str]] = {
    "400": (
        "The body is not a JSON object (invalid JSON or UTF-8, NaN/Infinity, a number out of "
        "range, a duplicate key, nesting deeper than 64).",
        _ERROR,
    ),
    "401": ("No bearer token, or one that was refused; see `WWW-Authenticate`.", _ERROR),
    "404": (
        "No function of that name (or, under a non-empty url_prefix, any other path below it).",
        _ERROR,
    ),
    "405": ("A method other than the one documented (or `OPTIONS`, answered 204); see `Allow`.", _ERROR),
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
_OPERATION_ERRORS = ("400", "406", "408", "413", "415", "422", "500", "503")


def build_document(
    functions: Mapping[str, RegisteredFunction],
    settings: Settings,
    *,
    url_prefix: str = "",
    title: str = "flask-sse-run",
    server_url: str = "/",
    more: Sequence[tuple[str, Mapping[str, RegisteredFunction]]] = (),
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``functions`` served under ``url_prefix``.

    ``more`` adds other instances' functions, as ``(url_prefix, functions)`` pairs.
    ``settings`` decides the security scheme (when auth is on) and the documented end event.
    """
    operations = sorted(
        (f"{prefix}/{name}", name, registered)
        for prefix, registry in [(url_prefix, functions), *more]
        for name, registered in registry.items()
    )
    refs, defs = models_json_schema(
        [(registered.binder.model, "validation") for _, _, registered in operations],
        by_alias=True,
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    paths: dict[str, Any] = {}
    for path, name, registered in operations:
        ref = refs[(registered.binder.model, "validation")]["$ref"]
        body_schema = schemas[ref.rsplit("/", 1)[1]]
        _describe_parameters(body_schema, parameter_docs(inspect.getdoc(registered.func)))
        operation = _operation(name, registered, ref, body_schema, settings)
        # Unique across instances: /run and /falcon/run are "run" and "falcon_run".
        operation["operationId"] = path.strip("/").replace("/", "_").replace("-", "_")
        paths[path] = {"post": operation}
    schemas.update(_own_schemas())
    components: dict[str, Any] = {
        "schemas": schemas,
        "responses": {code: _error_response(code) for code in ("404", "405")},
        "headers": {
            "X-Request-ID": {
                "description": "The request's id: the client's own if it was sane, else a new one.",
                "schema": {"type": "string"},
            }
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


def _operation(
    name: str, registered: RegisteredFunction, ref: str, body_schema: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    doc = inspect.getdoc(registered.func) or ""
    # The docstring is the operation's description; the body schema need not repeat it.
    body_schema.pop("description", None)
    success: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(model=_RESULT)}}}
    if _may_stream(registered.func):
        stream = _STREAM_DESCRIPTION
        if settings.end_event is not None:
            stream += f" A stream that finishes normally ends with an empty `event: {settings.end_event}`."
        # OpenAPI 3.1 has no word for a stream's items; like 3.2's itemSchema (and as
        # schemathesis reads it), the schema of text/event-stream describes one event.
        success = {
            "text/event-stream": {"schema": {"$ref": _REF.format(model=_EVENT), "description": stream}},
            **success,
        }
    responses: dict[str, Any] = {
        "200": {
            "description": "The function's output: a stream of events, or one JSON document for "
            "clients that accept only `application/json` (and for functions that return a value).",
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
            "content": success,
        }
    }
    codes = [code for code in _OPERATION_ERRORS if code != "408" or settings.body_timeout]
    if settings.auth_enabled and not registered.public:
        codes.append("401")
    for code in sorted(codes):
        responses[code] = _error_response(code)
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": doc.splitlines()[0] if doc else f"Run {name}",
        "requestBody": {
            # With no required parameter an empty body is a valid call.
            "required": bool(body_schema.get("required")),
            "content": {"application/json": {"schema": {"$ref": ref}}},
        },
        "parameters": [
            {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Echoed back if it is 1-128 characters of `A-Za-z0-9._:-`; "
                "otherwise the server picks a new id.",
                "schema": {"type": "string"},
            }
        ],
        "responses": responses,
    }
    if doc:
        operation["description"] = doc
    if settings.auth_enabled and registered.public:
        operation["security"] = []
    return operation


def _error_response(code: str) -> dict[str, Any]:
    description, schema = _ERRORS[code]
    headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if code == "401":
        headers["WWW-Authenticate"] = {
            "description": '`Bearer`, with `error="invalid_token"` when a token was refused.',
            "schema": {"type": "string"},
        }
    elif code == "405":
        headers["Allow"] = {"description": "The methods the URL accepts.", "schema": {"type": "string"}}
    return {
        "description": description,
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
                    "or a name given with flask_sse_run.Event.",
                },
                "id": {"type": "string"},
                "retry": {"type": "integer", "minimum": 0},
            },
            "required": ["data"],
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
    first, *others = state.instances
    document = build_document(
        first.functions,
        state.settings,
        url_prefix=first.url_prefix,
        more=[(other.url_prefix, other.functions) for other in others],
        title=state.settings.openapi_title or current_app.name,
        server_url=request.script_root or "/",
    )
    return Response(json.dumps(document, ensure_ascii=False), mimetype="application/json")
