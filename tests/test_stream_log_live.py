"""The stream log line under real gunicorn: in gunicorn's own log (gunicorn.conf.py sends it
there), one per stream, with every end reason the gevent body can give."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.live import Server, gunicorn

APP = "tests.observed_app:create_app()"
LINE = re.compile(
    r"\[(?P<pid>\d+)\] \[INFO\] stream ended request_id=(?P<request_id>\S+) run_id=(?P<run_id>\S+) "
    r"function=(?P<function>\S+) status=200 events=(?P<events>\d+) bytes=(?P<bytes>\d+) "
    r"duration=(?P<duration>\d+\.\d{3}) end=(?P<end>\w+)$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with gunicorn(APP, tmp_path=tmp_path_factory.mktemp("stream-log")) as srv:
        yield srv


def line_of(server: Server, request_id: str, timeout: float = 10) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = [m.groupdict() for m in LINE.finditer(server.log()) if m["request_id"] == request_id]
        if found:
            assert len(found) == 1, found  # one line per stream
            return found[0]
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.05)


def test_a_finished_stream_logs_one_line_with_what_it_sent(server: Server) -> None:
    response = requests.post(
        f"{server.url}/pid", json={"n": 3, "interval": 0.5}, timeout=10,
        headers={"X-Request-ID": "log-complete", "Accept-Encoding": "identity"},
    )  # fmt: skip
    line = line_of(server, "log-complete")
    assert (line["run_id"], line["function"], line["events"], line["end"]) == ("-", "pid", "3", "complete")
    assert line["bytes"] == str(len(response.content))
    assert 1.0 <= float(line["duration"]) < 5


def test_a_failure_a_disconnect_and_a_run_each_say_so(server: Server) -> None:
    requests.post(f"{server.url}/fail", json={"n": 1}, headers={"X-Request-ID": "log-error"}, timeout=10)
    assert line_of(server, "log-error")["end"] == "error"

    with requests.post(
        f"{server.url}/pid", json={"n": 100, "interval": 1.0}, stream=True, timeout=10,
        headers={"X-Request-ID": "log-leave"},
    ) as response:  # fmt: skip
        next(response.iter_lines())
    line = line_of(server, "log-leave")
    assert (line["events"], line["end"]) == ("1", "disconnect")

    response = requests.post(
        f"{server.url}/run_ticks", json={"n": 70, "interval": 0}, timeout=10,
        headers={"X-Request-ID": "log-run", "Accept-Encoding": "identity"},
    )  # fmt: skip
    line = line_of(server, "log-run")
    assert (line["run_id"], line["function"], line["end"]) == (
        response.headers["X-Run-ID"],
        "run_ticks",
        "complete",
    )
    # The run's events reach the response in the batches it stored: each event still counts.
    assert (line["events"], line["bytes"]) == ("70", str(len(response.content)))


def test_a_followed_run_that_is_cancelled_ends_its_stream_as_cancelled(server: Server) -> None:
    with requests.post(
        f"{server.url}/run_ticks", json={"n": 1000, "interval": 0.2}, stream=True, timeout=10,
        headers={"X-Request-ID": "log-cancelled"},
    ) as response:  # fmt: skip
        lines = response.iter_lines()
        next(lines)
        run_id = response.headers["X-Run-ID"]
        assert requests.delete(f"{server.url}/runs/{run_id}", timeout=10).status_code == 204
        list(lines)  # the run ends, and the stream with it
    line = line_of(server, "log-cancelled")
    assert (line["run_id"], line["end"]) == (run_id, "cancelled")


def test_a_worker_shutting_down_ends_its_streams_as_shutdown(tmp_path: Path) -> None:
    with gunicorn(APP, tmp_path=tmp_path) as srv:
        with requests.post(
            f"{srv.url}/pid", json={"n": 100, "interval": 1.0}, stream=True, timeout=10,
            headers={"X-Request-ID": "log-shutdown"},
        ) as response:  # fmt: skip
            lines = response.iter_lines()
            next(lines)
            os.kill(srv.process.pid, signal.SIGTERM)
            assert b"event: shutdown" in b"\n".join(lines)
        assert srv.process.wait(timeout=20) == 0
        line = line_of(srv, "log-shutdown")
    assert line["end"] == "shutdown"


def test_the_line_follows_gunicorns_log_level(tmp_path: Path) -> None:
    with gunicorn(APP, tmp_path=tmp_path, env={"GUNICORN_LOGLEVEL": "warning"}) as srv:
        requests.post(f"{srv.url}/pid", json={"n": 1}, headers={"X-Request-ID": "log-quiet"}, timeout=10)
        time.sleep(0.5)
        assert "stream ended" not in srv.log()
