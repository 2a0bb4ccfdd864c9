"""The request body: read it, within limits, as the JSON object of a function's arguments.

Everything here runs before the response starts, so every problem becomes a
:class:`RequestError` with a 4xx status and a JSON body. Messages name the problem but never
echo the input back.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Protocol

from .errors import RequestError, UnreadableBody
from .negotiation import JSON

__all__ = ["LARGE_BODY", "Offload", "Readable", "read_json_object"]

#: Deeper JSON is refused: nothing a function takes needs it, and validating or logging very deep
#: structures recurses.
MAX_DEPTH = 64
# Decoded UTF-8 cannot hold a surrogate; only a \uD800-\uDFFF escape can put one in a string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


#: Bodies larger than this are parsed through ``offload`` (see :func:`read_json_object`).
LARGE_BODY = 64 * 1024
Offload = Callable[[Callable[[bytes], dict[str, Any]], bytes], dict[str, Any]]


class Readable(Protocol):
    """What :func:`read_json_object` needs of the request stream."""

    def read(self, size: int = -1, /) -> bytes: ...


def _no_constants(name: str) -> Any:
    raise RequestError(400, f"body is not valid JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON but parses to inf, which JSON cannot represent on the way back out.
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(400, "body is not valid JSON for this API: a number is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise RequestError(400, "body is not valid JSON for this API: an object has a duplicate key")
    return result


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


def _has_lone_surrogate(value: Any) -> bool:
    # A lone surrogate is valid JSON but not text: it cannot be encoded to UTF-8, so a function
    # that echoes it would fail while answering (I-JSON, RFC 7493, refuses them too).
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


_DECODER = json.JSONDecoder(
    parse_constant=_no_constants, parse_float=_finite_float, object_pairs_hook=_unique_keys
)


def _is_json(content_type: str) -> bool:
    # Only the media type matters (parameters such as charset do not); it is case-insensitive.
    mimetype = content_type.partition(";")[0].strip().lower()
    return mimetype == JSON or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def read_json_object(
    stream: Readable,
    content_type: str,
    content_length: int | None,
    max_body: int,
    *,
    offload: Offload | None = None,
) -> dict[str, Any]:
    """Read and parse the request body; it must be a JSON object (an empty body means ``{}``).

    ``content_type`` is the request's Content-Type header as sent (looked at only when the body
    is not empty). ``offload(parse, raw)``, when given, parses bodies over ``LARGE_BODY`` bytes
    somewhere else than the calling thread (the view passes gevent's thread pool, so that a
    megabyte of JSON does not hold the hub that every stream of the worker needs).

    Raises :class:`RequestError`: 400 (:class:`~flask_sse_run.errors.UnreadableBody`) when the
    body cannot be read (malformed chunked framing, a connection closed mid-body), 413 over
    ``max_body`` bytes, 415 for a non-JSON Content-Type, 400 for invalid UTF-8 or JSON,
    NaN/Infinity or numbers beyond a float's range, duplicate keys, nesting too deep (over
    ``MAX_DEPTH``), lone surrogates (``"\\ud800"``), or JSON that is not an object.
    """
    if content_length is not None and content_length > max_body:
        raise RequestError(413, f"body is larger than {max_body} bytes")
    try:
        raw = stream.read(max_body + 1)
    except RequestError:
        raise
    except Exception as exc:  # the server's parse errors (a bad chunk size, a missing CRLF ...)
        # and its NoMoreData (an OSError) when the client half-closes mid-body.
        raise UnreadableBody(type(exc).__name__) from None
    if len(raw) > max_body:
        raise RequestError(413, f"body is larger than {max_body} bytes")
    if not raw.strip():
        return {}
    if not _is_json(content_type):
        raise RequestError(415, "Content-Type must be application/json")
    if offload is not None and len(raw) > LARGE_BODY:
        return offload(_parse, raw)
    return _parse(raw)


def _parse(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``, or the :class:`RequestError` that refuses it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "body is not valid UTF-8") from None
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise RequestError(
            400, f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON for this API: nested too deeply") from None
    except ValueError:  # an integer longer than Python's int parsing limit
        raise RequestError(400, "body is not valid JSON for this API: a number is too large") from None
    if not isinstance(value, dict):
        raise RequestError(400, "body must be a JSON object of the function's parameters")
    # Counting brackets is cheap and rules out deep nesting for almost every body.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _too_deep(value):
        raise RequestError(400, f"body is not valid JSON for this API: nested deeper than {MAX_DEPTH}")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise RequestError(400, "body is not valid JSON for this API: a string holds a lone surrogate")
    return value
