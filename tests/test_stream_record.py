"""What a stream's record counts and how it names the end, read from the stream log line,
through Flask's test client (the inline body; the gevent body's counts are in the live tests)."""

from __future__ import annotations

import gzip
import logging
import re
import time
from typing import Any

import pytest
from flask import Flask

from flask_sse_run.stream_log import LOGGER_NAME
from flask_sse_run.stream_record import ENDS, end_reason
from flask_sse_run.streaming import StreamResponse
from flask_sse_run.views import EXTENSION_KEY
from tests.observed_app import create_app

LINE = re.compile(
    r"stream ended request_id=(?P<request_id>\S+) run_id=(?P<run_id>\S+) function=(?P<function>\S+) "
    r"status=(?P<status>200) events=(?P<events>\d+) bytes=(?P<bytes>\d+) duration=(?P<duration>[\d.]+) "
    r"end=(?P<end>\w+)$"
)


def stream_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = []
    for record in caplog.records:
        if record.name == LOGGER_NAME:
            match = LINE.match(record.getMessage())
            assert match, record.getMessage()
            lines.append(match.groupdict())
    return lines


@pytest.fixture
def app() -> Flask:
    return create_app(TESTING=True)


@pytest.fixture(autouse=True)
def stream_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)


@pytest.mark.parametrize(
    ("ended_by", "error", "outcome", "end"),
    [
        (None, None, None, "complete"),
        (None, ValueError(), None, "error"),
        ("closed", ValueError(), None, "error"),  # it failed before the write that failed
        ("disconnect", None, None, "disconnect"),
        ("closed", None, None, "disconnect"),  # the server closed the body: a write failed
        ("shutdown", None, None, "shutdown"),
        (None, None, "cancelled", "cancelled"),
        (None, None, "error", "error"),
        (None, None, "shutdown", "shutdown"),
        ("disconnect", None, "cancelled", "disconnect"),  # the client left before the run ended
        (None, None, "running", "complete"),
    ],
)
def test_the_end_reason_says_what_ended_the_stream(
    ended_by: str | None, error: BaseException | None, outcome: str | None, end: str
) -> None:
    assert end_reason(ended_by, error, outcome) == end
    assert end in ENDS


def test_one_line_per_stream_counts_its_events_and_bytes(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    response = app.test_client().post("/pid", json={"n": 3}, headers={"X-Request-ID": "req-1"})
    body = response.get_data()
    [line] = stream_lines(caplog)
    assert line == {
        "request_id": "req-1",
        "run_id": "-",
        "function": "pid",
        "status": "200",
        "events": "3",
        "bytes": str(len(body)),
        "duration": line["duration"],
        "end": "complete",
    }


def test_bytes_are_what_was_sent_gzipped_and_events_stay_events(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    response = app.test_client().post("/pid", json={"n": 5}, headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(response.data).count(b"\n\n") == 5
    [line] = stream_lines(caplog)
    assert (line["events"], line["bytes"]) == ("5", str(len(response.data)))


def test_the_closing_event_counts_as_an_event(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(TESTING=True, SSE_RUN_END_EVENT="done")
    assert app.test_client().post("/pid", json={"n": 2}).data.endswith(b"event: done\ndata: \n\n")
    [line] = stream_lines(caplog)
    assert (line["events"], line["end"]) == ("3", "complete")


def test_a_failing_generator_ends_with_error(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    response = app.test_client().post("/fail", json={"n": 2})
    assert b"event: error" in response.data
    [line] = stream_lines(caplog)
    assert (line["events"], line["end"]) == ("3", "error")  # two items and the error event


def test_a_client_that_leaves_ends_with_disconnect(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    response = app.test_client().post("/pid", json={"n": 1000}, buffered=False)
    next(iter(response.response))
    response.close()
    [line] = stream_lines(caplog)
    assert line["end"] == "disconnect" and int(line["events"]) < 1000


def test_a_body_closed_before_its_first_step_still_ends(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    with app.test_request_context("/pid", method="POST", json={"n": 2}):
        response = app.full_dispatch_request()
        assert isinstance(response, StreamResponse) and response.record is not None
        response.close()  # the server never iterated it
    [line] = stream_lines(caplog)
    assert (line["events"], line["end"]) == ("0", "disconnect")


def test_a_response_that_follows_a_run_logs_its_run_id(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    client = app.test_client()
    response = client.post("/run_ticks", json={"n": 3, "interval": 0})
    run_id = response.headers["X-Run-ID"]
    assert response.data.count(b"\n\n") == 3
    follow = client.get(f"/runs/{run_id}", headers={"Last-Event-ID": f"{run_id}:1"})
    assert follow.data.count(b"\n\n") == 2
    first, second = stream_lines(caplog)
    assert (first["run_id"], first["function"], first["events"], first["end"]) == (
        run_id,
        "run_ticks",
        "3",
        "complete",
    )
    assert (second["run_id"], second["events"], second["end"]) == (run_id, "2", "complete")


def test_a_run_cancelled_ends_its_followers_as_cancelled(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    started = client.post(
        "/run_ticks", json={"n": 1000, "interval": 0.05}, headers={"Prefer": "respond-async"}
    )
    run_id = started.json["run_id"]  # type: ignore[index]
    time.sleep(0.2)
    assert client.delete(f"/runs/{run_id}").status_code == 204
    follow = client.get(f"/runs/{run_id}")  # replays what it made, then its end
    assert 0 < follow.data.count(b"\n\n") < 1000
    [line] = stream_lines(caplog)
    assert (line["run_id"], line["end"]) == (run_id, "cancelled")


def test_the_log_line_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(TESTING=True, SSE_RUN_STREAM_LOG=False)
    app.test_client().post("/pid", json={"n": 1}).get_data()
    assert stream_lines(caplog) == []


def test_nothing_observes_streams_when_everything_is_off() -> None:
    from flask_sse_run.config import Settings
    from flask_sse_run.observers import observers_for
    from flask_sse_run.tracing import SpanObserver

    observers = observers_for(Settings(stream_log=False))
    # Tracing is on only where opentelemetry-instrumentation-flask is installed (as in CI).
    assert observers is None or [type(member) for member in observers.members] == [SpanObserver]
    app = create_app(TESTING=True, SSE_RUN_STREAM_LOG=False)
    made = app.extensions[EXTENSION_KEY].observers
    assert (made is None) == (observers is None)
    if made is not None and observers is not None:
        assert [type(member) for member in made.members] == [type(member) for member in observers.members]
