"""The relay without a network: byte sources in, this stream's items out; upstream errors mapped."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from flask import Flask

from flask_sse_run import Event, SSERun, UpstreamError, read_events, relay
from flask_sse_run.errors import RequestError
from flask_sse_run.relay import error_message, refusal
from flask_sse_run.sse_parser import ParsedEvent
from flask_sse_run.streaming import error_event
from flask_sse_run.testing import stream_events

UPSTREAM = (
    b": welcome\n\n"
    b"data: plain\n\n"
    b"event: greeting\nid: 1\nretry: 5000\ndata: hello\n\n"
    b"id: 1\ndata: same id\n\n"
    b"data: two\ndata: lines\n\n"
    b"id: 2\n\n"
    b"data: after an id alone\n\n"
    b"data: unfinished\n"
)


def test_each_upstream_event_becomes_one_item_with_its_fields() -> None:
    items = list(relay([UPSTREAM[i : i + 7] for i in range(0, len(UPSTREAM), 7)]))
    assert items == [
        "plain",
        Event(data="hello", event="greeting", id="1", retry=5000),
        "same id",  # the ID did not change: not repeated
        "two\nlines",
        Event(data="after an id alone", id="2"),  # a block without data passes its ID on
    ]  # the comment is dropped (this stream sends its own keep-alives), the unfinished event too


def test_relayed_bytes_are_the_upstreams_events() -> None:
    encoded = b"".join(
        item.encode() if isinstance(item, Event) else Event(data=item).encode() for item in relay([UPSTREAM])
    )
    assert encoded == (
        b"data: plain\n\n"
        b"event: greeting\nid: 1\nretry: 5000\ndata: hello\n\n"
        b"data: same id\n\n"
        b"data: two\ndata: lines\n\n"
        b"id: 2\ndata: after an id alone\n\n"
    )


def test_read_events_gives_the_parsed_events() -> None:
    assert list(read_events([b"event: a\ndata: 1\n\n"])) == [ParsedEvent("1", "a")]


def test_closing_the_relay_closes_the_source_even_before_the_first_item() -> None:
    source = io.BytesIO(b"data: a\n\n")
    stream = relay(source)
    stream.close()  # a client that left before the first event
    assert source.closed


def test_the_source_is_closed_when_the_stream_ends_or_is_closed_midway() -> None:
    ended = io.BytesIO(b"data: a\n\ndata: b\n\n")
    assert list(relay(ended)) == ["a", "b"] and ended.closed
    midway = io.BytesIO(b"data: a\n\ndata: b\n\n")
    stream = relay(midway)
    assert next(stream) == "a" and not midway.closed
    stream.close()
    assert midway.closed


def test_an_event_over_the_limit_becomes_an_upstream_error() -> None:
    stream = relay([b"data: " + b"x" * 100 + b"\n\n"], max_event_bytes=64)
    with pytest.raises(UpstreamError) as failed:
        next(stream)
    assert failed.value.status == 502
    assert failed.value.message == "the upstream sent an event larger than 64 bytes"


def test_the_source_is_read_one_chunk_at_a_time_as_events_are_taken() -> None:
    reads: list[int] = []

    def source() -> Iterator[bytes]:
        for i in range(3):
            reads.append(i)
            yield f"data: {i}\n\ndata: {i}b\n\n".encode()

    stream = relay(source())
    assert next(stream) == "0" and reads == [0]
    assert next(stream) == "0b" and reads == [0]  # the second event came from the same read
    assert next(stream) == "1" and reads == [0, 1]


def test_a_bug_in_an_iterable_source_is_not_disguised_as_an_upstream_error() -> None:
    def source() -> Iterator[bytes]:
        yield b"data: a\n\n"
        raise KeyError("bug")

    stream = relay(source())
    assert next(stream) == "a"
    with pytest.raises(KeyError):
        next(stream)


def test_the_arguments_are_checked_when_the_relay_is_made() -> None:
    with pytest.raises(ValueError):
        relay([], chunk_size=0)
    with pytest.raises(ValueError):
        relay([], max_event_bytes=0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}',
            "max_tokens is too large",
        ),
        (b'{"object": "error", "message": "model not found", "code": 404}', "model not found"),
        (b'{"error": "Input validation error"}', "Input validation error"),
        (
            b'{"detail": "Unexpected fields in the request: {\'x\'}"}',
            "Unexpected fields in the request: {'x'}",
        ),
        (b'{"detail": [{"loc": ["body"], "msg": "Field required"}]}', "Field required"),
        (b"Internal Server Error", "Internal Server Error"),
        (b"line one\r\nline\ttwo\x00", "line one line two"),
        (b"", ""),
        (b"\xff bad utf-8", "\ufffd bad utf-8"),
        (b'{"unexpected": 1}', '{"unexpected": 1}'),
        (b"x" * 500, "x" * 299 + "…"),
    ],
)
def test_an_upstream_error_body_gives_a_short_one_line_message(body: bytes, message: str) -> None:
    assert error_message(body) == message


@pytest.mark.parametrize(
    ("status", "retry_after", "ours", "message", "headers"),
    [
        (400, None, 400, "the upstream refused the request (HTTP 400): why", {}),
        (422, None, 422, "the upstream refused the request (HTTP 422): why", {}),
        (429, "7", 429, "the upstream refused the request (HTTP 429): why", {"Retry-After": "7"}),
        (401, None, 502, "the upstream refused our credentials (HTTP 401): why", {}),
        (403, None, 502, "the upstream refused our credentials (HTTP 403): why", {}),
        (500, None, 502, "the upstream failed (HTTP 500): why", {}),
        (503, "5", 503, "the upstream is unavailable (HTTP 503): why", {"Retry-After": "5"}),
        (503, "Wed, 21 Oct 2015 07:28:00 GMT", 503, "the upstream is unavailable (HTTP 503): why", {}),
        (302, None, 502, "the upstream answered HTTP 302", {}),
    ],
)
def test_upstream_statuses_map_to_ours(
    status: int, retry_after: str | None, ours: int, message: str, headers: dict[str, str]
) -> None:
    error = refusal(status, "why", retry_after)
    assert (error.status, error.message, error.headers, error.upstream_status) == (
        ours,
        message,
        headers,
        status,
    )
    assert isinstance(error, RequestError)  # before the stream: a JSON error with that status


def test_an_upstream_error_event_shows_its_message_and_status_without_exposing_errors() -> None:
    error = UpstreamError(502, "the upstream connection broke mid-stream (IncompleteRead)")
    assert error_event(error, expose=False, request_id="r1") == (
        b"event: error\n"
        b'data: {"type":"UpstreamError",'
        b'"message":"the upstream connection broke mid-stream (IncompleteRead)","status":502}\n\n'
    )
    assert error_event(ValueError("secret"), expose=False, request_id="r1") == (
        b'event: error\ndata: {"type":"InternalError","message":"the stream failed (request id r1)"}\n\n'
    )


def test_a_relayed_stream_that_fails_ends_with_one_error_event() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def relayed() -> Iterator[str | Event]:
        return relay([b"data: a\n\n", b"data: " + b"x" * 100 + b"\n\n"], max_event_bytes=64)

    events = stream_events(app.test_client(), "/relayed")
    assert [(e.event, e.data) for e in events] == [
        ("message", "a"),
        (
            "error",
            '{"type":"UpstreamError","message":"the upstream sent an event larger than 64 bytes",'
            '"status":502}',
        ),
    ]
