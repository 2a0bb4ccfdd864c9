"""The event-stream parser: the WHATWG rules, byte for byte, in any chunking, in bounded memory."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flask_sse_run import Event
from flask_sse_run.sse_parser import EventStreamParser, ParsedEvent
from flask_sse_run.testing import SSEParser

E = ParsedEvent


def parse(stream: bytes, **kwargs: int) -> list[ParsedEvent]:
    parser = EventStreamParser(**kwargs)
    return parser.feed(stream)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data: a\n\n", [E("a")]),
        (b"data:a\n\n", [E("a")]),  # the space after the colon is optional
        (b"data:  a \n\n", [E(" a ")]),  # only one space is dropped; trailing ones stay
        (b"data: a\ndata: b\n\n", [E("a\nb")]),
        (b"data\n\n", [E("")]),  # a field name alone: the value is empty
        (b"data:\n\n", [E("")]),
        (b"data: a\r\n\r\n", [E("a")]),
        (b"data: a\r\rdata: b\n\n", [E("a"), E("b")]),  # CR alone ends a line
        (b"data: a\n\rdata: b\r\n\n", [E("a"), E("b")]),
        (b"event: add\ndata: 1\n\n", [E("1", "add")]),
        (b"event: add\n\ndata: 1\n\n", [E("1")]),  # a block without data resets the type
        (b"id: 7\ndata: a\n\ndata: b\n\n", [E("a", id="7"), E("b", id="7")]),  # the ID persists
        (b"id: 7\n\ndata: a\n\n", [E("a", id="7")]),  # set by a block without data
        (b"id: 7\ndata: a\n\nid\ndata: b\n\n", [E("a", id="7"), E("b", id="")]),  # reset by an empty id
        (b"id: a\x00b\ndata: x\n\n", [E("x")]),  # an ID with NUL is ignored
        (b"retry: 3000\ndata: a\n\ndata: b\n\n", [E("a", retry=3000), E("b")]),
        (b"retry: 3000\n\ndata: a\n\n", [E("a", retry=3000)]),  # passed on with the next event
        (b"retry: 30s\ndata: a\n\n", [E("a")]),  # not all digits: ignored
        (b"retry: -1\ndata: a\n\n", [E("a")]),
        (b"retry: \xd9\xa3\ndata: a\n\n", [E("a")]),  # a non-ASCII digit is not a digit here
        (b"retry:\ndata: a\n\n", [E("a")]),
        (b": ping\n\n", []),
        (b":\ndata: a\n\n", [E("a")]),
        (b"Data: a\n\n", []),  # field names are case-sensitive
        (b"foo: bar\ndata: a\n\n", [E("a")]),  # unknown fields are ignored
        (b"data: a: b\n\n", [E("a: b")]),  # only the first colon separates
        (b"\xef\xbb\xbfdata: a\n\n", [E("a")]),  # one leading BOM is dropped
        (b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", []),  # a second one makes the field name "\ufeffdata"
        (b"data: caf\xc3\xa9 \xe2\x98\x83\n\n", [E("café ☃")]),
        (b"data: \xff\xc3\n\n", [E("\ufffd\ufffd")]),  # invalid UTF-8: U+FFFD per maximal subpart
        (b"data: \xe2\x98\ndata: x\n\n", [E("\ufffd\nx")]),  # a sequence cut by a line end
        (b"data: a\n", []),  # no blank line yet: not dispatched
        (b"data: \x00\n\n", [E("\x00")]),  # NUL in data is data
    ],
)
def test_streams_parse_to_the_specs_events(stream: bytes, expected: list[ParsedEvent]) -> None:
    assert parse(stream) == expected


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"data: a\r", b"\n", b"\r\n"], [E("a")]),  # a CRLF split across chunks is one line end
        ([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"], [E("a\nb")]),
        ([b"data: a\r", b"\r", b"data: b\r", b"\n\r\n"], [E("a"), E("b")]),
        ([b"\xef", b"\xbb", b"\xbfdata: a\n\n"], [E("a")]),  # a BOM split across chunks
        ([b"da", b"ta", b": ", b"a", b"\n", b"\n"], [E("a")]),
        ([b"data: caf\xc3", b"\xa9\n\n"], [E("café")]),  # a character split across chunks
    ],
)
def test_chunk_boundaries_do_not_matter(chunks: list[bytes], expected: list[ParsedEvent]) -> None:
    parser = EventStreamParser()
    assert [event for chunk in chunks for event in parser.feed(chunk)] == expected
    assert parse(b"".join(chunks)) == expected


def test_a_cr_then_an_empty_chunk_still_swallows_the_lf_of_its_crlf() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == []  # the LF of the CRLF, not a blank line
    assert parser.feed(b"\n") == [E("a")]


def test_a_bom_is_dropped_only_at_the_start() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\n\n") == [E("a")]
    assert parser.feed(b"\xef\xbb\xbfdata: b\n\n") == []  # the field is "\ufeffdata": ignored


def test_an_unfinished_event_is_discarded_at_the_end() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [E("a")]
    assert parser.end() is True
    assert parser.end() is False


def test_comments_are_counted() -> None:
    parser = EventStreamParser()
    parser.feed(b": ping\n\n:x\ndata: a\n\n")
    assert parser.comments == 2 and parser.last_event_id == ""


def test_an_event_over_the_limit_raises_and_one_at_the_limit_passes() -> None:
    assert parse(b"data: " + b"x" * 10 + b"\n\n", max_event_bytes=16) == [E("x" * 10)]
    with pytest.raises(ValueError, match="an event larger than 16 bytes"):
        parse(b"data: " + b"x" * 11 + b"\n\n", max_event_bytes=16)
    with pytest.raises(ValueError, match="an event larger than 16 bytes"):  # many small data lines
        parse(b"data: 1234\n" * 3 + b"\n", max_event_bytes=16)


def test_a_line_that_never_ends_is_refused_before_it_fills_memory() -> None:
    parser = EventStreamParser(max_event_bytes=1000)
    parser.feed(b"data: ")
    with pytest.raises(ValueError):
        for _ in range(100):
            parser.feed(b"x" * 100)  # refused at the 10th chunk, not after the 100th


def test_the_limit_counts_per_event() -> None:
    parser = EventStreamParser(max_event_bytes=16)
    assert parser.feed(b"data: 1234567890\n\n" * 50) == [E("1234567890")] * 50


@pytest.mark.parametrize(
    "event",
    [
        Event(data="hello"),
        Event(data="two\nlines\r\nthree\rfour"),
        Event(data="", event="ping"),
        Event(data={"a": [1, "é"]}, event="json", id="42", retry=1500),
        Event(data=" leading and trailing ", id=""),
        Event(data="x", comment="a comment\nover two lines"),
    ],
)
def test_what_the_encoder_writes_parses_back(event: Event) -> None:
    text = event.data if isinstance(event.data, str) else '{"a":[1,"é"]}'
    expected = E(
        text.replace("\r\n", "\n").replace("\r", "\n"), event.event or "message", event.id or "", event.retry
    )
    assert parse(event.encode()) == [expected]


FRAGMENTS = [
    b"data", b"event", b"id", b"retry", b"Data", b":", b": ", b" ", b"x", b"7", b"\xc3", b"\xa9",
    b"\xe2\x98", b"\x83", b"\xff", b"\x00", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(FRAGMENTS), max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_stream_in_any_chunking_parses_as_the_independent_reference_does(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    parser = EventStreamParser()
    ours = [event for chunk in chunks for event in parser.feed(chunk)]
    reference = SSEParser().feed(stream)  # flask_sse_run.testing's, written separately, on text
    assert [(e.data, e.event, e.id) for e in ours] == [(e.data, e.event, e.id) for e in reference]
    assert ours == parse(stream)  # the chunking changes nothing
