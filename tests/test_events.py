from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from flask_sse_run.events import KEEPALIVE, Event, encode, encode_comment, json_value
from flask_sse_run.testing import ServerSentEvent, SSEParser, parse_events


class Point(BaseModel):
    x: int
    y: int


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("Number 0 ", b"data: Number 0 \n\n"),
        ("", b"data: \n\n"),
        (" leading", b"data:  leading\n\n"),
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb\rc", b"data: a\ndata: b\ndata: c\n\n"),
        ("end\n", b"data: end\ndata: \n\n"),
        ("caf\u00e9 \u2603", "data: caf\u00e9 \u2603\n\n".encode()),
        (b"raw \xc3\xa9", "data: raw \u00e9\n\n".encode()),
        ({"a": 1, "b": [1, 2]}, b'data: {"a":1,"b":[1,2]}\n\n'),
        ({"t": "\u00e9"}, '{"t":"\u00e9"}'.join(["data: ", "\n\n"]).encode()),
        ([1, "x"], b'data: [1,"x"]\n\n'),
        (3, b"data: 3\n\n"),
        (2.5, b"data: 2.5\n\n"),
        (True, b"data: true\n\n"),
        (None, b"data: null\n\n"),
        (Point(x=1, y=2), b'data: {"x":1,"y":2}\n\n'),
    ],
)
def test_encode_is_byte_exact(item: Any, expected: bytes) -> None:
    assert encode(item) == expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (Event("hi"), b"data: hi\n\n"),
        (Event("hi", event="greeting"), b"event: greeting\ndata: hi\n\n"),
        (Event("hi", id="7"), b"id: 7\ndata: hi\n\n"),
        (Event("hi", retry=3000), b"retry: 3000\ndata: hi\n\n"),
        (Event(comment="note"), b": note\n\n"),
        (Event(comment="two\nlines"), b": two\n: lines\n\n"),
        (Event(retry=0), b"retry: 0\n\n"),
        (Event("", event="end"), b"event: end\ndata: \n\n"),
        (
            Event({"k": None}, event="e", id="x", retry=1, comment="c"),
            b': c\nevent: e\nid: x\nretry: 1\ndata: {"k":null}\n\n',
        ),
    ],
)
def test_event_fields_are_byte_exact(event: Event, expected: bytes) -> None:
    assert event.encode() == expected
    assert encode(event) == expected


def test_comment_and_keepalive_bytes() -> None:
    assert KEEPALIVE == b": ping\n\n"
    assert encode_comment("a\rb") == b": a\n: b\n\n"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event": "a\nb"},
        {"event": "a\rb"},
        {"id": "1\n2"},
        {"id": "1\x002"},
        {"retry": -1},
        {"retry": 1.5},
        {"retry": True},
    ],
)
def test_event_rejects_fields_that_would_break_the_stream(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Event("x", **kwargs)


def test_event_rejects_non_str_names() -> None:
    with pytest.raises(TypeError):
        Event("x", event=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("item", [math.nan, {"x": math.inf}, object(), b"\xff"])
def test_unencodable_items_raise(item: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode(item)


def test_json_value_unwraps_events_bytes_and_models() -> None:
    assert json_value(Event({"a": 1}, event="x")) == {"a": 1}
    assert json_value(b"\xc3\xa9") == "\u00e9"
    assert json_value(Point(x=1, y=2)) == {"x": 1, "y": 2}
    assert json_value("s") == "s"


# The parser is written to the spec independently of the encoder; each checks the other.
def test_parser_follows_the_spec_line_rules() -> None:
    stream = b"\xef\xbb\xbfdata: a\r\ndata:b\rid: 4\n: comment\nevent: e\nretry: x1\nfield\n\n"
    assert parse_events(stream) == [ServerSentEvent(data="a\nb", event="e", id="4")]


def test_parser_handles_crlf_split_across_chunks() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r") == [ServerSentEvent(data="x")]
    assert parser.feed(b"\ndata: y\n\n") == [ServerSentEvent(data="y")]


def test_parser_does_not_dispatch_events_without_data() -> None:
    assert parse_events(b"event: x\n\nid: 9\n\ndata: z\n\n") == [ServerSentEvent(data="z", id="9")]


@given(st.text())
def test_any_text_round_trips_through_a_spec_parser(text: str) -> None:
    try:
        wire = encode(text)
    except UnicodeEncodeError:  # lone surrogates are not UTF-8 text
        return
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert parse_events(wire) == [ServerSentEvent(data=expected)]


_name = st.text().filter(lambda s: "\r" not in s and "\n" not in s)


@given(
    data=st.text(),
    event=st.none() | _name.filter(lambda s: s != ""),
    id=st.none() | _name.filter(lambda s: "\0" not in s),
    chunk=st.integers(min_value=1, max_value=7),
)
def test_events_round_trip_in_any_chunking(data: str, event: str | None, id: str | None, chunk: int) -> None:
    try:
        wire = Event(data, event=event, id=id).encode() + encode("after")
    except UnicodeEncodeError:
        return
    pieces = [wire[i : i + chunk] for i in range(0, len(wire), chunk)]
    expected_data = data.replace("\r\n", "\n").replace("\r", "\n")
    assert parse_events(pieces) == [
        ServerSentEvent(data=expected_data, event=event or "message", id=id or ""),
        ServerSentEvent(data="after", id=id or ""),
    ]


def test_parser_keeps_a_crlf_together_across_an_empty_chunk() -> None:
    # requests' gzip decoding yields empty chunks; one between CR and LF must not end a line.
    assert parse_events([b"data: a\r", b"", b"\ndata: b\r\n\r\n"]) == [ServerSentEvent(data="a\nb")]
