from __future__ import annotations

import os
import random
import uuid

import pytest

from flask_sse_run import negotiation
from flask_sse_run.errors import RequestError
from flask_sse_run.negotiation import request_id, wants_stream


@pytest.mark.parametrize(
    ("header", "stream"),
    [
        (None, True),
        ("*/*", True),
        ("text/event-stream", True),
        ("application/json", False),
        ("application/json, text/event-stream;q=0.5", False),
        ("application/json, */*;q=0.5", False),  # HTTPie's, when it sends JSON (docs/clients.md)
        ("text/event-stream, application/json;q=0.9", True),
        ("text/*", True),
        ("text/event-stream, */*", True),
        ("application/json;q=0.9, text/event-stream;q=0.1", False),
        ("", True),
        # axios's default, and its reverse: the wildcard takes streams as much as JSON.
        ("application/json, text/plain, */*", True),
        ("*/*, application/json", True),
        ("application/json, */*;q=0.8", False),
        ("application/json;q=0.5, text/*;q=0.5", True),
        ("application/json;q=0.5, text/*", True),
        # The most specific range decides: an explicit q=0 is a refusal, whatever */* says.
        ("text/event-stream;q=0, */*", False),
        ("application/json;q=0, */*", True),
        ("TEXT/EVENT-STREAM;q=0.3, application/json;q=0.2", True),
    ],
)
def test_negotiates_stream_or_json(header: str | None, stream: bool) -> None:
    assert wants_stream(header) is stream


@pytest.mark.parametrize(
    "header", ["text/html", "text/event-stream;q=0, application/json;q=0", "*/*;q=0", "image/*"]
)
def test_accepting_neither_is_406(header: str) -> None:
    with pytest.raises(RequestError) as info:
        wants_stream(header)
    assert info.value.status == 406


def test_request_id_keeps_a_sane_client_id() -> None:
    assert request_id("abc-123_x.y:z") == "abc-123_x.y:z"


@pytest.mark.parametrize("header", [None, "", "a\r\nSet-Cookie: x=1", "x" * 129, "spaces are odd", "\u00e9"])
def test_request_id_replaces_anything_else(header: str | None) -> None:
    rid = request_id(header)
    assert rid != header and uuid.UUID(hex=rid).version == 4


def test_new_request_ids_are_random_version_4_uuids() -> None:
    ids = [request_id(None) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for rid in ids:
        parsed = uuid.UUID(hex=rid)
        assert parsed.hex == rid and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Every other hex digit varies: the bits are random, not a counter or a clock.
    for position in {*range(32)} - {12, 16}:
        assert len({rid[position] for rid in ids}) == 16


def test_seeding_random_does_not_make_request_ids_repeat() -> None:
    state = random.getstate()
    try:
        random.seed(42)
        first = request_id(None)
        random.seed(42)
        assert request_id(None) != first
    finally:
        random.setstate(state)


def test_forked_workers_do_not_repeat_each_others_request_ids() -> None:
    # gunicorn forks its workers from one master: each must draw its own ids.
    state = negotiation._ids.getstate()
    negotiation._ids.seed(1234)  # the master's state, as every child inherits it
    try:
        child, parent = _first_id_in_a_child(), request_id(None)
    finally:
        negotiation._ids.setstate(state)
    assert len(child) == 32 and child != parent


def _first_id_in_a_child() -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write_end, request_id(None).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()
