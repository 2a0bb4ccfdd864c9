"""The helpers users test their own endpoints with: ``stream_events`` and ``iter_events``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_sse_run import Event, SSERun
from flask_sse_run.testing import ServerSentEvent, iter_events, stream_events
from tests.apps import create_app, endless_app


def test_stream_events_returns_every_event_of_the_stream(client: FlaskClient) -> None:
    assert stream_events(client, "/count", json={"n": 3}) == [
        ServerSentEvent(data='{"i":0}'),
        ServerSentEvent(data='{"i":1}'),
        ServerSentEvent(data='{"i":2}'),
    ]


def test_stream_events_reads_event_names_ids_and_retry(client: FlaskClient) -> None:
    events = stream_events(client, "/events")
    assert events[0] == ServerSentEvent(data="hello", event="greeting", id="1", retry=5000)
    assert [e.data for e in events[1:]] == ["", "two\nlines", "bytes \u00e9", "null", "[1,2.5,true]"]


def test_stream_events_passes_headers_on(client: FlaskClient) -> None:
    assert stream_events(client, "/whoami", headers={"X-Caller": "alice"}) == [ServerSentEvent(data="alice")]
    assert stream_events(client, "/whoami", headers=[("X-Caller", "bob")]) == [ServerSentEvent(data="bob")]


def test_stream_events_shows_the_status_and_body_of_a_rejection(client: FlaskClient) -> None:
    with pytest.raises(AssertionError) as info:
        stream_events(client, "/count", json={})
    message = str(info.value)
    assert "POST /count: expected a 200 text/event-stream, got 422 UNPROCESSABLE ENTITY" in message
    assert '"loc":["n"]' in message


def test_stream_events_refuses_a_json_answer(client: FlaskClient) -> None:
    with pytest.raises(AssertionError, match="got 200 OK application/json"):
        stream_events(client, "/plain", json={"a": 1})


def test_iter_events_yields_each_event_as_it_is_yielded() -> None:
    app = Flask(__name__)
    sse = SSERun(app)
    released = threading.Event()

    @sse.function
    def gated() -> Iterator[Event | str]:
        yield Event("first", event="start")
        # If iter_events waited for the whole body, the test would read "timed out".
        yield "second" if released.wait(5) else "timed out"

    events = iter_events(app.test_client().post("/gated", buffered=False))
    assert next(events) == ServerSentEvent(data="first", event="start")
    released.set()
    assert next(events) == ServerSentEvent(data="second")
    assert list(events) == []


def test_leaving_iter_events_early_closes_the_generator() -> None:
    app, closed, _ = endless_app()
    for event in iter_events(app.test_client().post("/endless", buffered=False)):
        assert event.data == "1"
        break
    assert closed.wait(1)


def test_the_readme_testing_examples_work_on_the_readmes_run() -> None:
    client = create_app().test_client()  # its run is the README's ten-line example
    assert stream_events(client, "/run", json={"upper_range": 2}) == [
        ServerSentEvent(data="Number 0 "),
        ServerSentEvent(data="Number 1 "),
    ]
    started = time.monotonic()
    response = client.post("/run", json={"upper_range": 100}, buffered=False)
    for event in iter_events(response):
        assert event.data == "Number 0 "
        break
    assert time.monotonic() - started < 0.5  # the first event, not the hundredth second
