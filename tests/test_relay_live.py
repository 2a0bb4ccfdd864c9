"""The relay under real gunicorn (gevent worker), relaying from another real flask-sse-run server."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_sse_run import Event, UpstreamError, open_stream, relay
from flask_sse_run.testing import SSEParser
from tests.live import Server, free_port, gunicorn
from tests.sse_clients import timed_events
from tests.upstreams import trickling_headers, wait_answering

APP = "tests.relay_apps:create_app()"
NO_GZIP = {"Accept-Encoding": "identity"}


@contextmanager
def serve(tmp_path: Path) -> Iterator[Server]:
    """The test app under gunicorn, once it answers a request."""
    with gunicorn(APP, tmp_path=tmp_path) as server:
        wait_answering(f"{server.url}/health", server.process, server.log_path, 30)
        yield server


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("upstream")) as server:
        yield server


@pytest.fixture(scope="module")
def relayer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("relayer")) as server:
        yield server


def relay_request(relayer: Server, url: str, **params: Any) -> requests.Response:
    return requests.post(
        f"{relayer.url}/relay_from", json={"url": url, **params}, headers=NO_GZIP, stream=True, timeout=30
    )


def data_of(item: str | Event) -> Any:
    return item.data if isinstance(item, Event) else item


def stats(server: Server) -> dict[str, Any]:
    return requests.get(f"{server.url}/stats", timeout=5).json()  # type: ignore[no-any-return]


def test_events_are_relayed_field_for_field(upstream: Server, relayer: Server) -> None:
    response = relay_request(relayer, f"{upstream.url}/mixed")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    assert response.content == (
        b"event: greeting\nid: 1\nretry: 5000\ndata: hello\n\n"
        b"data: \n\n"  # the comment-only block is not an event: dropped
        b"data: two\ndata: lines\n\n"
        b"id: 2\ndata: \xc3\xa9 \xe2\x98\x83\n\n"
        b"data: [1,2.5,true]\n\n"
    )


def test_each_event_is_relayed_when_the_upstream_sends_it(upstream: Server, relayer: Server) -> None:
    started = time.monotonic()
    with relay_request(relayer, f"{upstream.url}/produce", body={"n": 3, "interval": 0.6}) as response:
        events = timed_events(response)
    assert [event.data for _, event in events] == ["0000000000", "0000000001", "0000000002"]
    times = [t - started for t, _ in events]
    # One every 0.6 s, as the upstream sends them: not held back until the upstream's end.
    assert times[0] < 0.5, times
    assert 0.4 < times[1] - times[0] and 0.4 < times[2] - times[1], times


def test_a_client_that_leaves_closes_the_upstream_at_once(upstream: Server, relayer: Server) -> None:
    before = stats(upstream)["finally"]
    # An event every 5 s: an upstream that noticed only at its next write would take seconds.
    response = relay_request(relayer, f"{upstream.url}/produce", body={"interval": 5})
    assert [e.data for _, e in timed_events(response, limit=1)] == ["0000000000"]
    response.close()
    left = time.monotonic()
    while stats(upstream)["finally"] == before:
        assert time.monotonic() - left < 2, "the upstream's generator was not closed"
        time.sleep(0.02)


def test_a_slow_client_holds_the_upstream_back(upstream: Server, relayer: Server) -> None:
    before = stats(upstream)
    body = json.dumps({"url": f"{upstream.url}/produce", "body": {"size": 1000}}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing
    client.connect(("127.0.0.1", relayer.port))
    try:
        client.sendall(
            b"POST /relay_from HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        time.sleep(2)  # the socket buffers between the upstream and the client fill up
        first = stats(upstream)["produced"] - before["produced"]
        time.sleep(1)
        second = stats(upstream)["produced"] - before["produced"]
        # The upstream never blocks on its own: it stops only because nobody reads. Nothing
        # between it and the client buffers without bound (the socket buffers hold a few MB).
        assert first == second, (first, second)
        assert 0 < second < 50_000
        assert stats(upstream)["finally"] == before["finally"]
    finally:
        client.close()
    left = time.monotonic()
    while stats(upstream)["finally"] == before["finally"]:
        assert time.monotonic() - left < 5, "the upstream's generator was not closed"
        time.sleep(0.05)


def test_an_upstream_killed_mid_stream_gives_one_error_event_and_a_clean_end(
    tmp_path: Path, relayer: Server
) -> None:
    with serve(tmp_path) as doomed:
        response = relay_request(relayer, f"{doomed.url}/produce", body={"interval": 0.1})
        parser = SSEParser()
        chunks = response.raw.stream(65536, decode_content=True)
        received = []
        for chunk in chunks:
            received.extend(parser.feed(chunk))
            if len(received) >= 3:
                break
        killed = time.monotonic()
        os.killpg(doomed.process.pid, signal.SIGKILL)  # the master and its worker: no goodbye
        doomed.process.wait(timeout=10)
        for chunk in chunks:  # the rest, up to the body's proper end (no ChunkedEncodingError)
            received.extend(parser.feed(chunk))
        assert time.monotonic() - killed < 2
    errors = [e for e in received if e.event == "error"]
    assert received[-1] is errors[-1] and len(errors) == 1
    assert all(e.event == "message" for e in received[:-1])
    error = json.loads(errors[0].data)
    assert error["type"] == "UpstreamError" and error["status"] == 502
    assert error["message"].startswith("the upstream connection broke mid-stream (")


@pytest.mark.parametrize(
    ("status", "ours", "message", "retry_after"),
    [
        (422, 422, "the upstream refused the request (HTTP 422): refused with 422 on purpose", None),
        (404, 404, "the upstream refused the request (HTTP 404): refused with 404 on purpose", None),
        (401, 502, "the upstream refused our credentials (HTTP 401): refused with 401 on purpose", None),
        (503, 503, "the upstream is unavailable (HTTP 503): refused with 503 on purpose", "3"),
        (500, 502, "the upstream failed (HTTP 500): the function failed; see the server log", None),
    ],
)
def test_an_upstream_refusal_is_our_json_error_before_the_stream(
    upstream: Server, relayer: Server, status: int, ours: int, message: str, retry_after: str | None
) -> None:
    response = relay_request(relayer, f"{upstream.url}/refuse", body={"status": status})
    assert response.status_code == ours
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": message}
    assert response.headers.get("Retry-After") == retry_after


@pytest.mark.parametrize(
    ("status", "content_type", "ours", "message"),
    [
        (500, "text/html; charset=utf-8", 502, "the upstream failed (HTTP 500): Internal Server Error"),
        (502, "text/html", 502, "the upstream failed (HTTP 502): Bad Gateway"),
        (504, "text/plain", 502, "the upstream failed (HTTP 504): Gateway Timeout"),  # HTML all the same
        (400, "text/html", 400, "the upstream refused the request (HTTP 400): Bad Request"),
    ],
)
def test_an_upstreams_html_error_page_is_never_quoted(
    upstream: Server, relayer: Server, status: int, content_type: str, ours: int, message: str
) -> None:
    body = {"status": status, "content_type": content_type}
    response = relay_request(relayer, f"{upstream.url}/html_error", body=body)
    assert (response.status_code, response.json()) == (ours, {"error": message})
    assert "<" not in response.text


def test_an_unreachable_upstream_is_a_503(relayer: Server) -> None:
    response = relay_request(relayer, f"http://127.0.0.1:{free_port()}/produce")
    assert response.status_code == 503
    assert response.json() == {"error": "the upstream is unreachable (ConnectionRefusedError)"}


def test_an_upstream_that_does_not_answer_in_time_is_a_504(upstream: Server, relayer: Server) -> None:
    # flask-sse-run sends its headers with the first event: 3 s of silence before it.
    body = {"n": 1, "silent_first": 3}
    response = relay_request(relayer, f"{upstream.url}/produce", body=body, silence_timeout=1)
    assert response.status_code == 504
    assert response.json() == {"error": "the upstream did not answer within 1 s"}


def test_an_upstream_that_trickles_its_headers_is_a_504_at_the_deadline_and_is_closed(
    relayer: Server,
) -> None:
    # A header line every 0.5 s for 15 s: never 1 s without a byte. The deadline for the whole
    # answer is connect_timeout + silence_timeout: 2 s.
    with trickling_headers(interval=0.5, lines=30) as upstream:
        started = time.monotonic()
        response = relay_request(relayer, upstream.url, connect_timeout=1, silence_timeout=1)
        answered = time.monotonic()
        assert response.status_code == 504
        assert response.json() == {"error": "the upstream did not send its response headers within 2 s"}
        assert answered - started < 10  # at the deadline, not after the upstream's 15 s
        deadline = time.monotonic() + 10
        while not upstream.closed_at:
            assert time.monotonic() < deadline, "the upstream connection was left open"
            time.sleep(0.05)
        assert upstream.closed_at[0] - started < 10


def test_an_upstream_silent_mid_stream_ends_the_stream_with_a_504_error_event(
    upstream: Server, relayer: Server
) -> None:
    started = time.monotonic()
    body = {"n": 2, "interval": 3}
    with relay_request(relayer, f"{upstream.url}/produce", body=body, silence_timeout=1) as response:
        events = timed_events(response)
    assert [e.event for _, e in events] == ["message", "error"]
    assert json.loads(events[1][1].data) == {
        "type": "UpstreamError",
        "message": "the upstream went silent: nothing arrived within its read timeout",
        "status": 504,
    }
    assert 0.8 < events[1][0] - started < 2.5  # after 1 s of silence, not at the upstream's 3 s


def test_a_response_opened_with_httpx_is_relayed(upstream: Server) -> None:
    httpx = pytest.importorskip("httpx2")  # httpx's API (huggingface_hub brings it)
    with (
        httpx.Client() as client,
        client.stream("POST", f"{upstream.url}/produce", json={"n": 3}) as response,
    ):
        assert [data_of(item) for item in relay(response)] == ["0000000000", "0000000001", "0000000002"]
    with (
        httpx.Client() as client,
        client.stream("POST", f"{upstream.url}/refuse", json={"status": 422}) as response,
    ):
        with pytest.raises(UpstreamError) as refused:
            next(relay(response))
    assert refused.value.status == 422 and refused.value.message.endswith("refused with 422 on purpose")


def test_a_requests_response_opened_by_hand_is_checked_when_relayed(upstream: Server) -> None:
    response = requests.post(f"{upstream.url}/refuse", json={"status": 404}, stream=True, timeout=10)
    with pytest.raises(UpstreamError) as refused:
        next(relay(response))
    assert refused.value.status == 404
    response = requests.post(f"{upstream.url}/produce", json={"n": 2}, stream=True, timeout=10)
    assert [data_of(item) for item in relay(response)] == ["0000000000", "0000000001"]


def test_the_shared_session_ignores_proxy_settings_of_the_environment(
    upstream: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    # A proxy may buffer a stream, and reading these settings cost 1 ms a request: not used.
    items = relay(open_stream(f"{upstream.url}/produce", json={"n": 1}))
    assert [data_of(item) for item in items] == ["0000000000"]
