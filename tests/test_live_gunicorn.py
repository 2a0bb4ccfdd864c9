"""The seed's example against real gunicorn with the gevent worker, read by real clients."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flask_sse_run.extension import SYNC_WORKER_WARNING
from flask_sse_run.testing import SSEParser
from tests.live import ROOT, Server, answers, free_port, gunicorn

SEED_BODY = b"data: Number 0 \n\ndata: Number 1 \n\ndata: Number 2 \n\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with gunicorn(tmp_path=tmp_path_factory.mktemp("live")) as srv:
        yield srv


def timed_events(response: requests.Response) -> list[tuple[float, str]]:
    parser, out = SSEParser(), []
    for chunk in response.raw.stream(1024, decode_content=True):
        now = time.monotonic()
        out.extend((now, event.data) for event in parser.feed(chunk))
    return out


def assert_seed_stream(url: str) -> None:
    """POST the seed's request to ``url``/run: three events, the first at once, one a second."""
    started = time.monotonic()
    with requests.post(
        f"{url}/run",
        json={"upper_range": 3},
        headers={"Accept-Encoding": "identity"},
        stream=True,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        events = timed_events(response)
    assert [data for _, data in events] == ["Number 0 ", "Number 1 ", "Number 2 "]
    assert events[0][0] - started < 0.9
    assert all(after - before >= 0.9 for (before, _), (after, _) in itertools.pairwise(events))


def test_the_seed_example_streams_one_event_a_second_with_requests(server: Server) -> None:
    started = time.monotonic()
    with requests.post(
        f"{server.url}/run",
        json={"upper_range": 3},
        headers={"Accept": "text/event-stream", "Accept-Encoding": "identity"},
        stream=True,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert response.headers["Transfer-Encoding"] == "chunked"
        events = timed_events(response)
    assert [data for _, data in events] == ["Number 0 ", "Number 1 ", "Number 2 "]
    # The first event is sent before the generator sleeps, so before the second is yielded.
    assert events[0][0] - started < 0.9
    for (before, _), (after, _) in itertools.pairwise(events):
        assert after - before >= 0.9


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_seed_curl_call_prints_the_seed_output_progressively(server: Server) -> None:
    command = [
        "curl", "-sS", "-N", "-X", "POST", f"{server.url}/run",
        "-H", "Content-Type: application/json", "-H", "Accept: text/event-stream",
        "--data", '{"upper_range": 3}',
    ]  # fmt: skip
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    arrivals, output = [], b""
    try:
        while len(output) < len(SEED_BODY):
            chunk = process.stdout.read1(4096)
            if not chunk:
                break
            output += chunk
            arrivals.append((time.monotonic() - started, output.count(b"\n\n")))
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    assert output == SEED_BODY
    first = next(t for t, n in arrivals if n >= 1)
    second = next(t for t, n in arrivals if n >= 2)
    third = next(t for t, n in arrivals if n >= 3)
    assert first < 0.9 and second - first >= 0.9 and third - second >= 0.9


def raw_request(server: Server, body: bytes, path: str = "/fail_after") -> bytes:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_a_failing_generator_ends_the_http_body_properly(server: Server) -> None:
    raw = raw_request(server, b'{"n": 2}')
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body.endswith(b"0\r\n\r\n")  # the final chunk: the body was ended, not cut
    assert b"event: error\ndata: {" in body
    # The worker goes on serving.
    assert requests.post(f"{server.url}/count", json={"n": 1}, timeout=5).text == 'data: {"i":0}\n\n'
    assert "Traceback" in server.log() and "ValueError: boom at the end" in server.log()


def test_bad_input_is_json_under_gunicorn_too(server: Server) -> None:
    response = requests.post(
        f"{server.url}/run", data=b"{", headers={"Content-Type": "application/json"}, timeout=5
    )
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert response.json()["error"].startswith("body is not valid JSON")


def test_the_seed_example_streams_under_the_flask_development_server(tmp_path: Path) -> None:
    # `flask run`: no gevent, the generator runs in the request's thread (as under sync workers).
    port = free_port()
    with (tmp_path / "flask.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "tests.apps:create_app", "run",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_listening(port, process)
        assert_seed_stream(f"http://127.0.0.1:{port}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def wait_until_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not answers(port):
        assert process.poll() is None, "the server exited at start-up"
        assert time.monotonic() < deadline, "the server did not answer in time"
        time.sleep(0.05)


OWN_APP = """
import time
from flask import Flask
from flask_sse_run import SSERun

app = Flask(__name__)
sse = SSERun(app)


@sse.function
def countdown(start: int):
    for i in range(start, 0, -1):
        yield i
        time.sleep(0.1)
"""


def test_gunicorn_conf_serves_an_app_of_ones_own(tmp_path: Path) -> None:
    # The way the README says: gunicorn -c gunicorn.conf.py yourmodule:app, from your project,
    # where this repository's example_app cannot be imported (even with FALCON_MODEL set, which
    # makes the file's hooks look for it).
    project = tmp_path / "project"
    project.mkdir()
    (project / "myapp.py").write_text(OWN_APP)
    env = {"PYTHONPATH": "", "FALCON_MODEL": "tiiuae/falcon-7b-instruct"}
    with gunicorn("myapp:app", tmp_path=tmp_path, cwd=project, env=env) as srv:
        response = requests.post(f"{srv.url}/countdown", json={"start": 3}, timeout=10)
        log = srv.log()
    assert response.status_code == 200
    assert response.content == b"data: 3\n\ndata: 2\n\ndata: 1\n\n"
    assert "Traceback" not in log and "No module named" not in log


def test_example_app_serves_the_seed_function_as_a_resumable_run(tmp_path: Path) -> None:
    with gunicorn("wsgi:app", tmp_path=tmp_path) as srv:
        assert requests.get(f"{srv.url}/health", timeout=5).json() == {"status": "ok"}
        response = requests.post(
            f"{srv.url}/run", json={"upper_range": 2}, headers={"Accept-Encoding": "identity"}, timeout=10
        )
        run_id = response.headers["X-Run-ID"]
        assert response.content == (
            f"id: {run_id}:1\ndata: Number 0 \n\nid: {run_id}:2\ndata: Number 1 \n\n".encode()
        )
        # EventSource's way in: GET with the arguments in the query string.
        response = requests.get(
            f"{srv.url}/run", params={"upper_range": 1}, headers={"Accept-Encoding": "identity"}, timeout=10
        )
        assert response.content == f"id: {response.headers['X-Run-ID']}:1\ndata: Number 0 \n\n".encode()
        assert "Using worker: gevent" in srv.log()
        assert SYNC_WORKER_WARNING not in srv.log()


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_the_seed_example_streams_under_sync_and_thread_workers(tmp_path: Path, worker_class: str) -> None:
    # No gevent: the generator runs in the request's thread and each item is written at once.
    with gunicorn(tmp_path=tmp_path, env={"GUNICORN_WORKER_CLASS": worker_class}) as srv:
        assert_seed_stream(srv.url)
        log = srv.log()
    assert f"Using worker: {worker_class}" in log
    # The sync worker cuts streams at its timeout: it is told at start-up, once, what to run.
    assert log.count(SYNC_WORKER_WARNING) == (1 if worker_class == "sync" else 0)
