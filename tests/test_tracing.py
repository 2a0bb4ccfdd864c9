"""A stream's request span (opentelemetry-instrumentation-flask, the real SDK and its in-memory
exporter) covers the whole stream and says how it went: in-process, and under real gunicorn."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask
from opentelemetry import trace
from opentelemetry.instrumentation import flask as otel_flask
from opentelemetry.sdk.trace import ReadableSpan

from flask_sse_run import tracing
from flask_sse_run.testing import SSEParser
from tests.live import Server, gunicorn
from tests.observed_app import create_app


@pytest.fixture
def app() -> Flask:
    return create_app(TESTING=True, tracing=True)


def spans(app: Flask) -> list[ReadableSpan]:
    return list(app.extensions["test_span_exporter"].get_finished_spans())


def request_span(app: Flask, target: str) -> ReadableSpan:
    [span] = [s for s in spans(app) if s.attributes and s.attributes.get("http.target") == target]
    return span


def seconds(span: ReadableSpan) -> float:
    assert span.start_time is not None and span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


@pytest.fixture(autouse=True)
def no_detach_failure(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        yield
    assert "Failed to detach context" not in caplog.text


def test_we_take_the_keys_the_installed_instrumentation_uses() -> None:
    assert tracing.SPAN_KEY == otel_flask._ENVIRON_SPAN_KEY
    assert tracing.ACTIVATION_KEY == otel_flask._ENVIRON_ACTIVATION_KEY
    assert tracing.TOKEN_KEY == otel_flask._ENVIRON_TOKEN


def test_a_streams_span_lasts_as_long_as_the_stream(app: Flask) -> None:
    started = time.monotonic()
    body = app.test_client().post("/pid", json={"n": 3, "interval": 0.4}).get_data()
    took = time.monotonic() - started
    span = request_span(app, "/pid")
    assert 0.8 <= seconds(span) <= took
    assert span.attributes is not None
    assert {key: span.attributes[key] for key in span.attributes if key.startswith("sse_run.")} == {
        "sse_run.function": "pid",
        "sse_run.events": 3,
        "sse_run.bytes": len(body),
        "sse_run.end": "complete",
    }
    assert span.attributes["http.status_code"] == 200
    assert span.status.status_code == trace.StatusCode.UNSET
    assert trace.get_current_span() is trace.INVALID_SPAN  # its context was detached


def test_a_failed_stream_marks_its_span_as_an_error(app: Flask) -> None:
    app.test_client().post("/fail", json={"n": 2}).get_data()
    span = request_span(app, "/fail")
    assert span.attributes is not None and span.attributes["sse_run.end"] == "error"
    assert span.attributes["sse_run.events"] == 3
    assert span.status.status_code == trace.StatusCode.ERROR


def test_a_client_that_leaves_ends_the_span_as_a_disconnect(app: Flask) -> None:
    response = app.test_client().post("/pid", json={"n": 100, "interval": 0.01}, buffered=False)
    next(iter(response.response))
    assert [s for s in spans(app) if s.name.startswith("POST")] == []  # still open
    response.close()
    span = request_span(app, "/pid")
    assert span.attributes is not None and span.attributes["sse_run.end"] == "disconnect"


def test_a_run_followers_span_carries_the_run_id(app: Flask) -> None:
    response = app.test_client().post("/run_ticks", json={"n": 3, "interval": 0.2})
    response.get_data()
    span = request_span(app, "/run_ticks")
    assert span.attributes is not None
    assert span.attributes["sse_run.run_id"] == response.headers["X-Run-ID"]
    assert span.attributes["sse_run.events"] == 3 and seconds(span) >= 0.4


def test_spans_the_generator_makes_are_children_of_the_request_span(app: Flask) -> None:
    app.test_client().post("/traced", json={"n": 2}).get_data()
    span = request_span(app, "/traced")
    children = [s for s in spans(app) if s.name.startswith("item ")]
    assert len(children) == 2
    assert all(c.parent is not None and c.parent.span_id == span.context.span_id for c in children)


def test_other_answers_keep_the_instrumentations_own_span(app: Flask) -> None:
    client = app.test_client()
    assert client.post("/pid", json={"n": "x"}).status_code == 422
    assert client.post("/pid", json={"n": 1}, headers={"Accept": "application/json"}).status_code == 200
    refused, collected = [s for s in spans(app) if s.name.startswith("POST")]
    for span in (refused, collected):
        assert span.attributes is not None and not any(k.startswith("sse_run.") for k in span.attributes)
    assert refused.attributes is not None and refused.attributes["http.status_code"] == 422


# --- under gunicorn's gevent worker ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with gunicorn(
        "tests.observed_app:create_app()",
        tmp_path=tmp_path_factory.mktemp("tracing"),
        env={"OBSERVED_TRACING": "1"},
    ) as srv:
        yield srv


def live_spans(server: Server) -> list[dict[str, Any]]:
    return requests.get(f"{server.url}/spans", timeout=10).json()  # type: ignore[no-any-return]


def test_under_gunicorn_a_stream_of_seconds_gets_a_span_of_seconds(server: Server) -> None:
    before = time.time()
    events: list[tuple[float, str]] = []
    with requests.post(
        f"{server.url}/pid?case=long",
        json={"n": 4, "interval": 1.0},
        headers={"Accept-Encoding": "identity"},
        stream=True,
        timeout=30,
    ) as response:
        parser, body = SSEParser(), b""
        for chunk in response.raw.stream(1024):
            body += chunk
            events.extend((time.time(), e.data) for e in parser.feed(chunk))
    after = time.time()
    assert len(events) == 4
    [span] = [s for s in live_spans(server) if s["attributes"].get("http.target") == "/pid?case=long"]
    assert before - 0.05 <= span["start"] <= events[0][0]
    assert events[-1][0] - 0.05 <= span["end"] <= after + 0.05  # it ended with the stream
    assert span["end"] - span["start"] >= 2.9
    assert {key: v for key, v in span["attributes"].items() if key.startswith("sse_run.")} == {
        "sse_run.function": "pid",
        "sse_run.events": 4,
        "sse_run.bytes": len(body),
        "sse_run.end": "complete",
    }


def test_under_gunicorn_the_next_request_on_the_connection_gets_a_span_of_its_own(server: Server) -> None:
    with requests.Session() as session:
        for path, body in (("/traced", {"n": 2}), ("/run_ticks", {"n": 2, "interval": 0})):
            response = session.post(f"{server.url}{path}", json=body, timeout=10)
            assert response.status_code == 200 and response.text.count("\n\n") == 2
    by_target = {s["attributes"].get("http.target"): s for s in live_spans(server) if s["kind"] == "SERVER"}
    traced, run = by_target["/traced"], by_target["/run_ticks"]
    # Each request is a root span of its own trace: the first one's context did not leak into
    # the greenlet that served the second on the same keep-alive connection.
    assert traced["parent"] is None and run["parent"] is None and traced["trace_id"] != run["trace_id"]
    assert run["attributes"]["sse_run.run_id"] == response.headers["X-Run-ID"]
    children = [s for s in live_spans(server) if s["name"].startswith("item ")]
    assert len(children) == 2 and all(c["parent"] == traced["span_id"] for c in children)


def test_under_gunicorn_a_client_that_leaves_ends_the_span_at_once(server: Server) -> None:
    with requests.post(
        f"{server.url}/pid?case=leave", json={"n": 100, "interval": 1.0}, stream=True, timeout=30
    ) as response:
        next(response.iter_lines())
        left = time.time()
    deadline = time.monotonic() + 10
    while not (
        found := [s for s in live_spans(server) if s["attributes"].get("http.target") == "/pid?case=leave"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert found[0]["attributes"]["sse_run.end"] == "disconnect"
    assert found[0]["end"] - left < 1.0  # the read watcher saw the FIN: not at the next event
