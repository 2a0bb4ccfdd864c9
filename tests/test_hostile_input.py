"""Hostile input against real gunicorn (gevent worker): every rejection's status and body, no
5xx, no worker restart; then a bounded schemathesis run against the generated OpenAPI document.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi import checks

from tests.live import Server, gunicorn

BODY_TIMEOUT = 1.0
FUZZ_TOKEN = "fuzz-token-0123456789"
API = "body is not valid JSON for this API: "
NOT_JSON = "body is not valid JSON: "


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = {"SSE_RUN_BODY_TIMEOUT": BODY_TIMEOUT}
    with gunicorn(tmp_path=tmp_path_factory.mktemp("hostile"), config=config) as srv:
        yield srv


@pytest.fixture(autouse=True)
def worker_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each live test: the one worker booted at start-up is still the only one."""
    yield
    for name in ("server", "fuzz_server"):
        if name in request.fixturenames:
            srv: Server = request.getfixturevalue(name)
            assert srv.log().count("Booting worker") == 1, srv.log()
            assert requests.get(f"{srv.url}/openapi.json", timeout=5).status_code == 200


def post(server: Server, body: bytes, path: str = "/count", **headers: str) -> requests.Response:
    return requests.post(
        f"{server.url}{path}",
        data=body,
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )


def assert_error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": message}


class Raw:
    """One HTTP exchange over a plain socket, for requests no well-behaved client would send."""

    def __init__(self, server: Server, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_all(self) -> bytes:
        """Read until the server closes the connection."""
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        return data


def raw_exchange(server: Server, data: bytes) -> tuple[int, bytes]:
    raw = Raw(server)
    raw.send(data)
    response = raw.read_all()
    return int(response.split(b" ", 2)[1]), response


# --- bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"n":' + b"[" * 100_000 + b"]" * 100_000 + b"}", API + "nested too deeply"),
        (b'{"n":' + b"[" * 64 + b"]" * 64 + b"}", API + "nested deeper than 64"),
        (b'{"n": 1e400}', API + "a number is out of range"),
        (b'{"n": -1e400}', API + "a number is out of range"),
        (b'{"n": 1' + b"0" * 5000 + b"}", API + "a number is too large"),
        (b'{"n": NaN}', NOT_JSON + "NaN is not a JSON number"),
        (b'{"n": Infinity}', NOT_JSON + "Infinity is not a JSON number"),
        (b'{"n": -Infinity}', NOT_JSON + "-Infinity is not a JSON number"),
        (b'{"n": 1, "n": 2}', API + "an object has a duplicate key"),
        (b'{"n": 1, "label": "\xff\xfe"}', "body is not valid UTF-8"),
        (b'{"n": 1, "label": "\xed\xa0\x80"}', "body is not valid UTF-8"),  # an encoded surrogate
        (b'{"n": 1, "label": "\\ud800"}', API + "a string holds a lone surrogate"),
        (b'{"n": 1, "\\udfff": 1}', API + "a string holds a lone surrogate"),
        (b'{"n": 1,}', NOT_JSON + "Expecting property name enclosed in double quotes at line 1 column 9"),
        (b"[1]", "body must be a JSON object of the function's parameters"),
        (b"\x00", NOT_JSON + "Expecting value at line 1 column 1"),
    ],
    ids=[
        "nested-100000", "nested-65", "1e400", "-1e400", "5001-digits", "NaN", "Infinity", "-Infinity",
        "duplicate-key", "invalid-utf8", "utf8-surrogate", "lone-surrogate-value", "lone-surrogate-key",
        "trailing-comma", "array", "nul",
    ],
)  # fmt: skip
def test_a_hostile_body_is_400_with_a_json_error(server: Server, body: bytes, message: str) -> None:
    assert_error(post(server, body), 400, message)


def test_a_nan_string_for_a_float_parameter_is_422(server: Server) -> None:
    response = post(server, b'{"n": 1, "delay": "NaN"}')
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid parameters",
        "detail": [{"loc": ["delay"], "msg": "Input should be a finite number", "type": "finite_number"}],
    }


def test_a_500_kb_unknown_key_is_a_small_422(server: Server) -> None:
    response = post(server, b'{"n": 1, "' + b"u" * 500_000 + b'": 1}')
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["u" * 32 + "\u2026"]
    assert len(response.content) < 2048


def test_a_megabyte_of_unknown_keys_is_refused_without_freezing_the_other_streams(server: Server) -> None:
    # 90,000 unknown keys (980 KB): pydantic building an error for each froze every stream of
    # the worker for about half a second; a stream ticking every 50 ms shows the worker's gaps.
    body = json.dumps({str(i): 1 for i in range(90_000)}, separators=(",", ":")).encode()
    assert len(body) < 1 << 20
    with requests.post(
        f"{server.url}/ticks", json={"n": 60, "interval": 0.05}, stream=True, timeout=30
    ) as ticking:
        times: list[float] = []  # when the server's generator ran: what a frozen hub delays
        for line in ticking.iter_lines():
            if line.startswith(b"data: "):
                times.append(float(line[6:]))
                if len(times) == 10:  # the ticks flow: now the big bodies arrive, one after another
                    for _ in range(3):
                        response = post(server, body)
                        assert response.status_code == 422
                        detail = response.json()["detail"]
                        assert len(detail) == 51 and detail[-1]["msg"] == "89951 more problems were omitted"
    assert len(times) == 60
    # Before: gaps of 0.4-0.6 s. After: the parse, in the thread pool, leaves the hub free.
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.3


def test_huge_integers_that_are_valid_json_are_served_exactly(server: Server) -> None:
    response = post(server, b'{"a": 1' + b"0" * 300 + b', "b": 1}', "/plain", Accept="application/json")
    assert response.status_code == 200
    assert response.json()["result"] == {"sum": 10**300 + 1}


def test_a_body_over_max_body_sent_chunked_is_413(server: Server) -> None:
    chunks = (b'{"n": 1, "pad": "' + b"x" * 65536 for _ in range(17))  # over 1 MiB, no Content-Length
    response = requests.post(
        f"{server.url}/count", data=chunks, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert_error(response, 413, "body is larger than 1048576 bytes")


def test_a_declared_length_over_max_body_is_413_before_the_body_is_read(server: Server) -> None:
    status, response = raw_exchange(
        server,
        b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 99999999\r\nConnection: close\r\n\r\n{",
    )
    assert status == 413
    assert response.endswith(b'{"error":"body is larger than 1048576 bytes"}')


# --- headers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("separator", [b"\r\n", b"\r", b"\n"])
def test_a_line_break_in_x_request_id_cannot_inject_a_response_header(
    server: Server, separator: bytes
) -> None:
    status, response = raw_exchange(
        server,
        b"POST /count HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc" + separator + b"Set-Cookie: evil=1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 8\r\nConnection: close\r\n\r\n"
        b'{"n": 1}',
    )
    head = response.split(b"\r\n\r\n", 1)[0]
    if separator == b"\r\n":
        # A real line break ends the header: "Set-Cookie" is then a request header, and it
        # never reaches the response.
        assert status == 200 and b"X-Request-ID: abc\r\n" in head + b"\r\n"
    else:
        assert status == 400 and b"Invalid HTTP Header: &#x27;X-REQUEST-ID&#x27;" in response
    assert b"evil" not in head


@pytest.mark.parametrize(
    "request_id", ["abc%0d%0aSet-Cookie:%20evil=1", "x" * 129, "spaces are odd", "\u00e9t\u00e9"]
)
def test_an_odd_x_request_id_is_replaced_not_echoed(server: Server, request_id: str) -> None:
    response = requests.post(
        f"{server.url}/count",
        json={"n": 1},
        headers={"X-Request-ID": request_id.encode("utf-8").decode("latin-1")},
        timeout=5,
    )
    assert response.status_code == 200
    assert len(response.headers["X-Request-ID"]) == 32 and response.headers["X-Request-ID"].isalnum()
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize(
    ("head", "status", "message"),
    [
        (b"X-Big: " + b"a" * 9000 + b"\r\n", 431, b"limit request headers fields size"),
        (b"".join(b"X-%d: a\r\n" % i for i in range(120)), 431, b"limit request headers fields"),
    ],
    ids=["one-9000-byte-header", "120-headers"],
)
def test_oversized_headers_are_refused_and_the_worker_keeps_serving(
    server: Server, head: bytes, status: int, message: bytes
) -> None:
    code, response = raw_exchange(server, b"POST /count HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    assert code == status
    assert message in response
    assert post(server, b'{"n": 1}').text == 'data: {"i":0}\n\n'


def test_an_oversized_request_line_is_414(server: Server) -> None:
    code, response = raw_exchange(server, b"POST /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 414
    assert b"Request Line is too large" in response


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND", "GET"])
def test_an_unserved_method_is_a_json_405_through_gunicorn(server: Server, method: str) -> None:
    response = requests.request(method, f"{server.url}/count", timeout=5)
    assert response.headers["Allow"] == "OPTIONS, POST"
    assert_error(response, 405, "this endpoint accepts POST only")


def test_options_is_204_with_allow_through_gunicorn(server: Server) -> None:
    response = requests.options(f"{server.url}/count", timeout=5)
    assert response.status_code == 204
    assert response.headers["Allow"] == "OPTIONS, POST"


CHUNKED_HEAD = (
    b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
UNREADABLE = "the request body could not be read: malformed framing or an incomplete body"


@pytest.mark.parametrize(
    ("body", "half_close"),
    [
        (b"zz\r\n{}\r\n0\r\n\r\n", False),
        (b"2;\x01\r\n{}\r\n0\r\n\r\n", False),
        (b"2\r\n{}XX0\r\n\r\n", False),
        (b"2\r\n{}\r\n0\r\nno-colon-here\r\n\r\n", False),
        (b'8\r\n{"n": ', True),
    ],
    ids=["chunk-size", "chunk-extension", "chunk-without-crlf", "trailer-without-colon", "half-close"],
)
def test_a_body_that_cannot_be_read_is_a_400_json_error_logged_in_one_line(
    server: Server, body: bytes, half_close: bool
) -> None:
    raw = Raw(server)
    raw.send(CHUNKED_HEAD + body)
    if half_close:
        raw.sock.shutdown(socket.SHUT_WR)
    response = raw.read_all()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), response
    assert b"Content-Type: application/json" in head and b"X-Request-ID: " in head
    assert _dechunk(payload) == b'{"error":"%s"}' % UNREADABLE.encode()
    rid = next(line for line in head.split(b"\r\n") if line.startswith(b"X-Request-ID: "))[14:].decode()
    log = server.log()
    assert f"request {rid}: the body could not be read (" in log
    assert "Traceback" not in log and "Error handling request" not in log


def _dechunk(body: bytes) -> bytes:
    if not body.startswith((b"{", b"[")):  # chunked framing
        out = b""
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            out, body = out + body[:size], body[size + 2 :]
        return out
    return body


# --- slow clients ----------------------------------------------------------------------------


def slow_request(length: int, first: bytes) -> bytes:
    return (
        b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    ) + first


def assert_408_and_closed(raw: Raw, started: float) -> None:
    response = raw.read_all()  # returns only once the server has closed the connection
    elapsed = time.monotonic() - started
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"Content-Type: application/json" in head
    assert body == b'{"error":"the request body did not arrive within 1 seconds"}'
    # Well under the 1.7 s a per-read timeout would take with the trickle below.
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 0.6


def test_a_body_that_stops_coming_is_408_and_the_connection_closed(server: Server) -> None:
    raw = Raw(server)
    started = time.monotonic()
    raw.send(slow_request(100, b'{"n": 1,  '))  # 10 of the 100 bytes, then nothing
    # While that client stalls, the worker serves others.
    assert post(server, b'{"n": 1}').text == 'data: {"i":0}\n\n'
    assert time.monotonic() - started < BODY_TIMEOUT
    assert_408_and_closed(raw, started)


def test_a_body_trickled_byte_by_byte_is_408_too(server: Server) -> None:
    raw = Raw(server)
    started = time.monotonic()
    raw.send(slow_request(100, b"{"))
    stop = threading.Event()

    def trickle() -> None:  # one byte every 0.2 s: each read succeeds, the whole body never does
        # Stopping just before the deadline: a byte that reaches the closed connection makes the
        # kernel answer RST, which can discard the 408 before the test reads it.
        while not stop.wait(0.2) and time.monotonic() - started < BODY_TIMEOUT - 0.3:
            try:
                raw.sock.sendall(b" ")
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        assert_408_and_closed(raw, started)
    finally:
        stop.set()
        thread.join(2)


# --- fuzzing ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    config = {"SSE_RUN_AUTH_TOKENS": [FUZZ_TOKEN], "SSE_RUN_BODY_TIMEOUT": 5}
    with gunicorn(
        "tests.fuzz_app:create_app()", tmp_path=tmp_path_factory.mktemp("fuzz"), config=config
    ) as srv:
        yield srv


# Accepted bodies are coerced by pydantic ("42" for an int, false for a float): that is the
# documented contract, so invalid-looking data being accepted is not a failure here.
EXCLUDED_CHECKS = [checks.negative_data_rejection]
ACCEPT = st.sampled_from([None, "text/event-stream", "application/json", "*/*"])
AUTHORIZATION = st.sampled_from([f"Bearer {FUZZ_TOKEN}", None]) | st.from_regex(r"\ABearer [ -~]{0,40}\Z")


@pytest.mark.timeout(120)
def test_schemathesis_finds_no_5xx_and_no_contract_violation(fuzz_server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    session = requests.Session()
    failures: list[str] = []
    calls = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if "/channels" in operation.path:
            continue  # a channel's stream never ends: fuzzed below, by a client that leaves
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(
                case=operation.as_strategy(generation_mode=mode), accept=ACCEPT, authorization=AUTHORIZATION
            )
            @hypothesis.settings(
                max_examples=30,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def call(case: Any, accept: str | None, authorization: str | None) -> None:
                nonlocal calls
                calls += 1
                headers = {
                    name: value
                    for name, value in (("Accept", accept), ("Authorization", authorization))
                    if value is not None
                }
                case.call_and_validate(
                    session=session, headers=headers, timeout=10, excluded_checks=EXCLUDED_CHECKS
                )

            try:
                call()
            except Exception as exc:  # keep going: report every operation's failure at once
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    elapsed = time.monotonic() - started
    session.close()  # idle keep-alive connections would hold up gunicorn's graceful stop
    assert failures == []
    assert calls >= 200 and elapsed < 180  # bounded: a hang would show here, not slowness
    log = fuzz_server.log()
    assert "Traceback" not in log  # no stream failed quietly with an error event either
    assert '" 5' not in log  # the access log shows no 5xx status


# A channel's name, a channel stream's id, and anything else a client may send in their place.
CHANNEL_NAME = st.from_regex(r"\A[A-Za-z0-9_.:@-]{1,12}\Z")
ANY_NAME = CHANNEL_NAME | st.text(max_size=16)
POSITION = st.lists(st.tuples(CHANNEL_NAME, st.integers(0, 10**18)), min_size=1, max_size=3).map(
    lambda parts: ",".join(f"{name}:{seq}" for name, seq in parts)
)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
REFUSALS = {400, 401, 405, 406}


@pytest.mark.timeout(120)
def test_the_channel_urls_answer_fuzzed_requests_with_a_stream_or_a_json_refusal(fuzz_server: Server) -> None:
    """The channel URLs, left out of the schemathesis run (which reads every answer whole, and a
    channel's stream never ends): each answer is a stream that starts with its id, or a JSON
    refusal, never a 5xx; the client reads a stream's first block and leaves."""
    session = requests.Session()
    calls = 0

    @given(
        names=st.lists(ANY_NAME, max_size=34),
        in_path=st.booleans(),
        last=st.none() | POSITION | HEADER_TEXT,
        method=st.sampled_from(["GET", "GET", "GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"]),
        accept=ACCEPT,
        authorization=AUTHORIZATION,
    )
    @hypothesis.example(["news", "user:42"], False, "news:3,user:42:0", "GET", None, f"Bearer {FUZZ_TOKEN}")
    @hypothesis.example(["user:42"], True, None, "GET", "text/event-stream", f"Bearer {FUZZ_TOKEN}")
    @hypothesis.example(["news!"], True, None, "GET", None, f"Bearer {FUZZ_TOKEN}")
    @hypothesis.example([".."], True, None, "GET", None, f"Bearer {FUZZ_TOKEN}")
    @hypothesis.example(["news"], False, "12", "GET", "*/*", f"Bearer {FUZZ_TOKEN}")
    @hypothesis.settings(
        max_examples=150,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(
        names: list[str],
        in_path: bool,
        last: str | None,
        method: str,
        accept: str | None,
        authorization: str | None,
    ) -> None:
        nonlocal calls
        calls += 1
        url = f"{fuzz_server.url}/channels"
        if in_path and names:
            url += "/" + urllib.parse.quote(names[0], safe="")
        query = [] if in_path else [("channel", name) for name in names]
        headers = {
            name: value
            for name, value in (("Accept", accept), ("Authorization", authorization), ("Last-Event-ID", last))
            if value is not None
        }
        with session.request(method, url, params=query, headers=headers, stream=True, timeout=10) as response:
            status, kind = response.status_code, response.headers.get("Content-Type", "")
            where = f"{method} {url} {query} {headers}: {status}"
            if status == 200:
                assert method == "GET" and kind == "text/event-stream; charset=utf-8", where
                first = next(response.iter_content(chunk_size=None))
                assert first.startswith(b"id: ") and first.endswith(b"\n\n"), (where, first)
            elif status == 204:
                assert method == "OPTIONS" and response.headers["Allow"] == "GET, OPTIONS", where
            elif status == 404:
                # A name that holds "/", or none, "." or ".." (the client makes "/channels/" or "/"
                # of them): no channel URL; the app's own 404.
                assert in_path and (names[0] in ("", ".", "..") or "/" in names[0]), where
            else:
                assert status in REFUSALS, where
                assert response.headers["X-Request-ID"], where
                if method != "HEAD":
                    assert kind == "application/json", where
                    body = response.json()
                    assert list(body) == ["error"] and isinstance(body["error"], str), where

    try:
        call()
    finally:
        session.close()
    assert calls >= 100
    log = fuzz_server.log()
    assert "Traceback" not in log
    assert '" 5' not in log
