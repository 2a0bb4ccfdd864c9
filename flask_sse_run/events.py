"""Server-Sent Events wire format: turn what a generator yields into bytes.

Pure code: nothing here imports Flask, so the format can be tested byte for byte and reused.

Follows the WHATWG HTML "server-sent events" section. Deliberate choices, where the spec
leaves room or where peers differ:

* A ``str`` becomes one ``data:`` field per line, split on CRLF, CR and LF (the three line
  ends the spec's parser accepts). Whitespace is kept: ``"Number 0 "`` is written as
  ``data: Number 0 `` (one space after the colon is the separator the parser strips).
* An empty string still dispatches an event (``data: `` then the blank line); an
  :class:`Event` whose ``data`` is ``None`` writes no data field at all.
* ``dict``, ``list``, numbers, ``bool`` and ``None`` become compact JSON (``allow_nan`` off:
  ``NaN`` is not JSON and would break clients that ``JSON.parse`` the data). Objects with a
  pydantic-style ``model_dump`` are dumped in JSON mode.
* ``bytes`` are decoded as UTF-8 and written like a ``str``.
* Newlines in ``event`` or ``id`` would start a new field, and a NUL makes the spec ignore an
  ``id``: both are refused when the :class:`Event` is built, not silently rewritten.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "KEEPALIVE",
    "Encoded",
    "Event",
    "encode",
    "encode_comment",
    "encode_with_id",
    "json_dumps",
    "json_value",
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
#: Compact JSON, NaN refused: the encoding of event data, and of the JSON responses too.
json_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _field_lines(name: bytes, text: str) -> bytes:
    if "\n" not in text and "\r" not in text:
        return name + text.encode("utf-8") + b"\n"
    return b"".join(name + line.encode("utf-8") + b"\n" for line in _LINE_BREAK.split(text))


def _data_text(value: Any) -> str:
    """The text of a data field for any value a generator may yield."""
    value = json_value(value)  # the same meaning as in a JSON answer; text stays text
    return value if isinstance(value, str) else json_dumps(value)


@dataclass(frozen=True, slots=True)
class Event:
    """One Server-Sent Event with full control of its fields.

    ``data`` follows the same rules as a bare yielded value; ``None`` writes no data field.
    ``event`` and ``id`` must not contain CR, LF (or NUL for ``id``); ``retry`` is a
    non-negative ``int`` of milliseconds. Violations raise :class:`ValueError` at construction.
    """

    data: Any = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def __post_init__(self) -> None:
        for field, value in (("event", self.event), ("id", self.id)):
            if value is None:
                continue
            if not isinstance(value, str):
                raise TypeError(f"Event.{field} must be a str")
            if "\n" in value or "\r" in value:
                raise ValueError(f"Event.{field} must not contain a line break")
        if self.id is not None and "\0" in self.id:
            raise ValueError("Event.id must not contain NUL (the spec ignores such an id)")
        if self.retry is not None and (
            isinstance(self.retry, bool) or not isinstance(self.retry, int) or self.retry < 0
        ):
            raise ValueError("Event.retry must be a non-negative int (milliseconds)")
        if self.comment is not None and not isinstance(self.comment, str):
            raise TypeError("Event.comment must be a str")

    def encode(self) -> bytes:
        """The event's bytes, ending with the blank line that dispatches it."""
        parts = []
        if self.comment is not None:
            parts.append(_field_lines(b": ", self.comment))
        if self.event is not None:
            parts.append(b"event: " + self.event.encode("utf-8") + b"\n")
        if self.id is not None:
            parts.append(b"id: " + self.id.encode("utf-8") + b"\n")
        if self.retry is not None:
            parts.append(b"retry: %d\n" % self.retry)
        if self.data is not None:
            parts.append(_field_lines(b"data: ", _data_text(self.data)))
        parts.append(b"\n")
        return b"".join(parts)


class Encoded:
    """Bytes already in the wire format (whole events), written as they are.

    What a stream replays from a run's buffer: those events were encoded, with their ids, when
    the run produced them. Not for user code: a generator's ``bytes`` are text to send.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def encode(item: Any) -> bytes:
    """Encode one yielded item as one complete SSE event.

    Raises :class:`TypeError` or :class:`ValueError` for values that cannot be written
    (objects JSON cannot encode, ``NaN``, bytes that are not UTF-8).
    """
    if type(item) is str:  # the hot path: plain text, no line breaks
        if "\n" not in item and "\r" not in item:
            return b"data: " + item.encode("utf-8") + b"\n\n"
        return _field_lines(b"data: ", item) + b"\n"
    if type(item) is Encoded:
        return item.data
    if isinstance(item, Event):
        return item.encode()
    return _field_lines(b"data: ", _data_text(item)) + b"\n"


def encode_with_id(item: Any, id_prefix: bytes, seq: int) -> bytes:
    """Encode ``item`` as :func:`encode` does, with ``id: <id_prefix><seq>`` (which replaces an
    :class:`Event`'s own ``id``: a run's ids are what a client resumes from).

    ``id_prefix`` (ASCII, no CR, LF or NUL) is not checked here, on the hot path.
    """
    if isinstance(item, Event):
        return replace(item, id=f"{id_prefix.decode('ascii')}{seq}").encode()
    return b"id: %b%d\n%b" % (id_prefix, seq, encode(item))


def json_value(item: Any) -> Any:
    """What an item means as a JSON value (for clients that ask for one JSON document).

    An :class:`Event` contributes its data; bytes are decoded as UTF-8; pydantic-style models
    are dumped in JSON mode; everything else is returned as it is.
    """
    if isinstance(item, Event):
        item = item.data
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item).decode("utf-8")
    if hasattr(item, "model_dump"):
        return item.model_dump(mode="json")
    return item


def encode_comment(text: str) -> bytes:
    """A comment block (``: text``): ignored by clients, keeps proxies from timing out."""
    return _field_lines(b": ", text) + b"\n"


KEEPALIVE = encode_comment("ping")
