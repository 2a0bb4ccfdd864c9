"""The gevent runtime against real gunicorn: keep-alive, disconnects, fairness, gzip, shutdown."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flask_sse_run.testing import SSEParser
from tests.latency import polled_latencies
from tests.live import ROOT, Server, gunicorn
from tests.sse_clients import run_streams


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # No keep-alive: a disconnect these tests see noticed was noticed by the read watcher, not
    # by a ping's failed write, however slow the machine.
    with gunicorn(tmp_path=tmp_path_factory.mktemp("runtime"), config={"SSE_RUN_KEEPALIVE": 0}) as srv:
        yield srv


def stats(server: Server) -> dict[str, float]:
    return requests.get(f"{server.url}/stats", timeout=5).json()  # type: ignore[no-any-return]


def open_stream(
    server: Server, path: str, body: bytes, *, accept: str = "text/event-stream"
) -> socket.socket:
    """POST ``body`` to ``path`` on a raw socket."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: {accept}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def wait_for(condition: object, timeout: float) -> float:
    """Poll ``condition()`` until true; return the seconds it took."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
    return time.monotonic() - started


def test_the_worker_collects_garbage_as_gunicorn_conf_says(server: Server) -> None:
    # post_worker_init: the app's objects frozen out of the collector's sight, and full
    # collections rare (each scans every stream's objects while the whole worker waits).
    worker = stats(server)
    assert worker["gc_frozen"] > 10_000
    assert worker["gc_threshold"] == [700, 10, 1000]


def test_keepalive_pings_while_the_generator_blocks(tmp_path: Path) -> None:
    parser = SSEParser()
    arrivals: list[tuple[float, str]] = []
    with gunicorn(tmp_path=tmp_path, config={"SSE_RUN_KEEPALIVE": 0.5}) as srv:
        started = time.monotonic()
        with requests.post(
            f"{srv.url}/sleeper",
            json={"seconds": 1.8},
            stream=True,
            timeout=10,
            headers={"Accept-Encoding": "identity"},
        ) as response:
            for chunk in response.raw.stream(1024):
                seen = len(parser.comments)
                events = parser.feed(chunk)
                now = time.monotonic() - started
                arrivals += [(now, "ping")] * (len(parser.comments) - seen) + [(now, e.data) for e in events]
    labels = [label for _, label in arrivals]
    assert labels[0] == "start" and labels[-1] == "end"
    pings = [t for t, label in arrivals if label == "ping"]
    assert len(pings) == 3  # at 0.5, 1.0 and 1.5 s of silence
    assert all(abs(b - a - 0.5) < 0.3 for a, b in itertools.pairwise(pings))


def test_keepalive_zero_sends_no_pings(server: Server) -> None:
    sock = open_stream(server, "/sleeper", b'{"seconds": 1.2}')
    body = read_until(sock, b"0\r\n\r\n")
    sock.close()
    assert b"data: start" in body and b"data: end" in body
    assert b": ping" not in body


def test_a_disconnect_closes_a_blocked_generator_at_once(server: Server) -> None:
    before = stats(server)
    sock = open_stream(server, "/sleeper", b'{"seconds": 60}')
    assert b"data: start" in read_until(sock, b"data: start")
    sock.close()
    left = time.time()
    wait_for(lambda: stats(server)["finally"] == before["finally"] + 1, timeout=2)
    after = stats(server)
    # No ping is ever written here: the read watcher noticed (at once; margin for a slow machine).
    assert after["last_finally"] - left < 2.0
    # And its finally knows why.
    assert after["disconnected_in_finally"] == before["disconnected_in_finally"] + 1


@pytest.mark.parametrize(
    "after",
    [b"\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"],
    ids=["stray-crlf", "pipelined-request"],
)
def test_a_disconnect_is_noticed_behind_bytes_the_client_sent_after_its_request(
    server: Server, after: bytes
) -> None:
    before = stats(server)
    sock = open_stream(server, "/sleeper", b'{"seconds": 60}')
    read_until(sock, b"data: start")
    # Sent once the stream runs, so the server has not read them with the request.
    sock.sendall(after)
    time.sleep(0.3)  # they have reached the server and woken its watch
    sock.close()
    # No pings on this server (they would notice at a failed write): the watch saw the hang-up.
    wait_for(lambda: stats(server)["finally"] == before["finally"] + 1, timeout=5)
    assert stats(server)["disconnected_in_finally"] == before["disconnected_in_finally"] + 1


def test_a_pipelined_request_behind_a_stream_is_still_answered(server: Server) -> None:
    # The watch leaves what the client sent for the server: nothing is read away.
    sock = open_stream(server, "/sleeper", b'{"seconds": 1}')
    data = read_until(sock, b"data: start")
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data += read_until(sock, b'{"status":"ok"}')
    sock.close()
    assert b"data: end" in data and data.count(b"HTTP/1.1 200") == 2


def test_a_json_client_that_leaves_interrupts_the_generator_being_collected(server: Server) -> None:
    before = stats(server)
    sock = open_stream(server, "/sleeper", b'{"seconds": 60}', accept="application/json")
    wait_for(lambda: stats(server)["started"] == before["started"] + 1, timeout=5)
    sock.close()
    wait_for(lambda: stats(server)["finally"] == before["finally"] + 1, timeout=5)
    assert stats(server)["disconnected_in_finally"] == before["disconnected_in_finally"] + 1


def test_a_client_that_leaves_interrupts_a_plain_function_waiting_in_cooperative_io(server: Server) -> None:
    before = stats(server)
    sock = open_stream(server, "/plain_sleeper", b'{"seconds": 60}', accept="application/json")
    wait_for(lambda: stats(server)["plain_started"] == before["plain_started"] + 1, timeout=5)
    sock.close()
    wait_for(lambda: stats(server)["plain_finally"] == before["plain_finally"] + 1, timeout=5)
    assert stats(server)["plain_disconnected"] == before["plain_disconnected"] + 1
    assert '"POST /plain_sleeper HTTP/1.1" 499' in server.log()  # the access log marks it


def test_json_clients_that_leave_do_not_use_up_the_workers_connections(tmp_path: Path) -> None:
    # Each left request used to hold its greenlet (and a CLOSE_WAIT socket) for the whole run:
    # with worker_connections used up by them, the worker then answered nobody.
    clients = 20
    env = {"GUNICORN_WORKER_CONNECTIONS": str(clients + 1)}  # one more, for the /stats polls
    with gunicorn(tmp_path=tmp_path, config={"SSE_RUN_KEEPALIVE": 0}, env=env) as srv:
        socks = [
            open_stream(srv, "/sleeper", b'{"seconds": 3600}', accept="application/json")
            for _ in range(clients)
        ]
        wait_for(lambda: stats(srv)["started"] == clients, timeout=10)
        for sock in socks:
            sock.close()
        wait_for(lambda: stats(srv)["finally"] == clients, timeout=10)
        # Their connections are free again: as many new clients are all served.
        results = run_streams(srv.port, "/sleeper", {"seconds": 0}, clients, timeout=20)
        assert all(r.status == 200 and r.complete and len(r.event_times) == 2 for r in results)


def test_long_running_work_learns_its_client_left(server: Server) -> None:
    before = stats(server)["cancelled_seen"]
    sock = open_stream(server, "/watcher", b'{"seconds": 30}')
    read_until(sock, b"data: watching")
    sock.close()
    assert wait_for(lambda: stats(server)["cancelled_seen"] == before + 1, timeout=2) < 1


def test_a_blocking_iterator_in_a_thread_streams_while_the_worker_serves_others(server: Server) -> None:
    # iterate_in_thread under real gunicorn: items arrive one by one as the thread makes them,
    # and the worker's other endpoints answer meanwhile.
    parser, arrivals = SSEParser(), []
    requests.get(f"{server.url}/health", timeout=5)  # the first call pays for lazy set-up
    with polled_latencies(f"{server.url}/health") as latencies:
        started = time.monotonic()
        with requests.post(
            f"{server.url}/blocking_ticks",
            json={"n": 3, "interval": 1.0},
            headers={"Accept-Encoding": "identity"},
            stream=True,
            timeout=10,
        ) as response:
            for chunk in response.raw.stream(1024):
                arrivals += [(time.monotonic() - started, e.data) for e in parser.feed(chunk)]
    assert [data for _, data in arrivals] == ["0", "1", "2"]
    assert all(b - a > 0.6 for (a, _), (b, _) in itertools.pairwise(arrivals))  # no bursts
    # A worker frozen by the thread's blocking second would answer a poll a second late.
    assert len(latencies) > 50 and max(latencies) < 0.6


def test_a_client_leaving_stops_the_thread_of_a_blocking_iterator(server: Server) -> None:
    before = stats(server)
    sock = open_stream(server, "/blocking_ticks", b'{"n": 1000, "interval": 0.05}')
    read_until(sock, b"data: 1\n\n")
    sock.close()
    # The thread stops at its next item and runs the iterator's finally there.
    wait_for(lambda: stats(server)["thread_finally"] == before["thread_finally"] + 1, timeout=2)
    time.sleep(0.3)
    assert stats(server)["threads"] <= before["threads"] + 1  # the pool's idle thread at most


def test_dropped_clients_give_the_thread_pool_back_after_their_current_item(server: Server) -> None:
    # More dropped streams than the pool's 32 threads, each thread blocked in a 1 s item: each
    # finishes that item and fetches no other, the 8 still queued never start, and a new stream
    # gets a thread about a second later, not after every dropped stream has run on.
    before = stats(server)
    socks = [open_stream(server, "/blocking_ticks", b'{"n": 1000, "interval": 1.0}') for _ in range(40)]
    wait_for(lambda: stats(server)["thread_items"] >= before["thread_items"] + 32, timeout=10)
    for sock in socks:
        sock.close()
    dropped = stats(server)
    started = time.monotonic()
    with requests.post(
        f"{server.url}/blocking_ticks",
        json={"n": 1, "interval": 0.0},
        headers={"Accept-Encoding": "identity"},
        stream=True,
        timeout=20,
    ) as response:
        assert response.raw.read(9) == b"data: 0\n\n"
    waited = time.monotonic() - started
    wait_for(lambda: stats(server)["thread_finally"] == before["thread_finally"] + 33, timeout=10)
    # At most the item each thread was making when its client left.
    assert stats(server)["thread_items"] - dropped["thread_items"] <= 32 + 1
    assert waited < 5  # one blocking item (1 s) and margin; running on would take 1000 s


def test_hundreds_of_dropped_clients_leave_nothing_behind(server: Server) -> None:
    run_streams(server.port, "/sleeper", {"seconds": 0}, 20, timeout=10)  # warm lazily made objects
    before = stats(server)
    results = run_streams(server.port, "/sleeper", {"seconds": 60}, 300, timeout=20, drop_after_events=1)
    assert all(len(r.event_times) >= 1 for r in results)
    dropped_at = time.time()
    # Noticed by the read watchers (no pings here), every generator's finally has run ...
    wait_for(lambda: stats(server)["finally"] == before["finally"] + 300, timeout=10)
    assert stats(server)["last_finally"] - dropped_at < 5  # not at the generators' 60 s
    # ... and the worker holds no more greenlets, threads or open files than before.
    time.sleep(0.3)
    after = stats(server)
    assert after["pid"] == before["pid"]
    assert (after["greenlets"], after["threads"], after["fds"]) == (
        before["greenlets"],
        before["threads"],
        before["fds"],
    )


def test_a_never_blocking_stream_does_not_starve_the_others(tmp_path: Path) -> None:
    # --timeout 3: a worker whose hub never ran for 3 s would be killed mid-stream; the fast
    # stream runs for 7 s, more than twice that.
    with gunicorn(tmp_path=tmp_path, env={"GUNICORN_TIMEOUT": "3"}) as srv:
        firehose = subprocess.Popen(
            ["curl", "-sS", "-N", "-X", "POST", f"{srv.url}/firehose", "-H", "Content-Type: application/json",
             "--data", '{"seconds": 7}', "-o", str(tmp_path / "fire.out")]
        )  # fmt: skip
        try:
            time.sleep(0.3)
            slow = run_streams(srv.port, "/ticks", {"n": 4}, 200, timeout=20)
            assert firehose.wait(timeout=60) == 0
        finally:
            firehose.kill()
        body = (tmp_path / "fire.out").read_bytes()
        # The firehose ran its 7 s to a clean end (it yields in thousands); how many events it
        # made is a speed, measured by the benchmark, not here.
        assert body.count(b"\n\n") >= 1000 and body.count(b"\n\n") % 1000 == 0
        assert all(r.status == 200 and r.complete and len(r.event_times) == 4 for r in slow)
        # Starved, the slow streams would wait for the firehose's 7 s; served fairly, each
        # tick arrives about a second after the last (margin for a loaded machine).
        worst = max(r.max_gap() for r in slow)
        assert worst <= 2.5, worst
        assert "WORKER TIMEOUT" not in srv.log()


def http_chunks(sock: socket.socket) -> list[bytes]:
    """Read a chunked response to its end; return the chunks as the server framed them."""
    data = read_until(sock, b"\r\n0\r\n\r\n")
    _, _, body = data.partition(b"\r\n\r\n")
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(body[:size])
        body = body[size + 2 :]


def test_events_ready_together_go_out_in_few_writes(server: Server) -> None:
    sock = open_stream(server, "/firehose", b'{"n": 20000}')
    chunks = http_chunks(sock)
    sock.close()
    assert b"".join(chunks).count(b"\n\n") == 20000
    assert len(chunks) <= 20000 / 32  # one write per event would be 20000 chunks


def test_the_first_event_goes_out_before_the_generator_computes_on(server: Server) -> None:
    started = time.monotonic()
    sock = open_stream(server, "/busy_after_first", b'{"seconds": 3.0}')
    read_until(sock, b"data: first\n\n")
    assert time.monotonic() - started < 1.5  # not held while the generator computes for 3 s
    assert b"data: second" in read_until(sock, b"data: second")
    sock.close()


def test_held_events_do_not_wait_for_a_generator_that_blocks(server: Server) -> None:
    started = time.monotonic()
    sock = open_stream(server, "/burst_then_wait", b'{"n": 5, "wait": 3}')
    first = read_until(sock, b"data: 4\n\n")
    assert time.monotonic() - started < 1.5  # not after the 3 s block
    assert all(f"data: {i}\n\n".encode() in first for i in range(5))
    assert b"data: 5" not in first
    sock.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_gzip_streams_decode_event_by_event_with_curl(server: Server) -> None:
    process = subprocess.Popen(
        ["curl", "-sS", "-N", "--compressed", "-X", "POST", f"{server.url}/ticks",
         "-H", "Content-Type: application/json", "--data", '{"n": 3, "interval": 1.0}'],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    started, arrivals, output = time.monotonic(), [], b""
    while chunk := process.stdout.read1(4096):
        output += chunk
        arrivals.append((time.monotonic() - started, output.count(b"data: ")))
    assert process.wait(timeout=10) == 0
    firsts = [next(t for t, n in arrivals if n >= k) for k in (1, 2, 3)]
    assert firsts[0] < 0.9 and firsts[1] - firsts[0] >= 0.9 and firsts[2] - firsts[1] >= 0.9


def test_gzip_streams_decode_event_by_event_with_requests(server: Server) -> None:
    started, times = time.monotonic(), []
    with requests.post(
        f"{server.url}/ticks", json={"n": 3, "interval": 1.0}, stream=True, timeout=10,
        headers={"Accept-Encoding": "gzip"},
    ) as response:  # fmt: skip
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Vary"] == "Accept-Encoding"
        parser = SSEParser()
        for chunk in response.raw.stream(1024, decode_content=True):
            times += [time.monotonic() - started for _ in parser.feed(chunk)]
    assert len(times) == 3
    assert times[0] < 0.9 and times[1] - times[0] >= 0.9 and times[2] - times[1] >= 0.9


def test_gzip_body_is_one_complete_gzip_member(server: Server) -> None:
    response = requests.post(
        f"{server.url}/count", json={"n": 3}, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10
    )
    raw = response.raw.read(decode_content=False)
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert decompressor.decompress(raw) == b'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\n'
    assert decompressor.eof  # the trailer was written: not a truncated member


def test_gzip_can_be_turned_off(tmp_path: Path) -> None:
    with gunicorn(tmp_path=tmp_path, config={"SSE_RUN_GZIP": False}) as srv:
        response = requests.post(
            f"{srv.url}/count", json={"n": 1}, headers={"Accept-Encoding": "gzip"}, timeout=5
        )
        assert "Content-Encoding" not in response.headers
        assert response.content == b'data: {"i":0}\n\n'


def test_streams_reuse_a_keep_alive_connection(server: Server) -> None:
    with requests.Session() as session:
        for _ in range(3):
            response = session.post(f"{server.url}/count", json={"n": 2}, timeout=5)
            assert response.content == b'data: {"i":0}\n\ndata: {"i":1}\n\n'


def test_sigterm_ends_open_streams_with_the_shutdown_event(tmp_path: Path) -> None:
    # A name of our own (SSE_RUN_SHUTDOWN_EVENT); the default, "shutdown", is checked in
    # test_gevent_stream.py.
    config = {"SSE_RUN_SHUTDOWN_EVENT": "restarting"}
    with gunicorn(tmp_path=tmp_path, config=config, env={"GUNICORN_GRACEFUL_TIMEOUT": "20"}) as srv:
        sock = open_stream(srv, "/sleeper", b'{"seconds": 60}')
        read_until(sock, b"data: start")
        os.kill(srv.process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        rest = read_until(sock, b"0\r\n\r\n")
        assert time.monotonic() - signalled < 3  # not the 20 s graceful timeout
        assert b"event: restarting\ndata: \n\n" in rest
        assert rest.endswith(b"0\r\n\r\n")  # the body was ended, not cut
        assert srv.process.wait(timeout=10) == 0


@pytest.mark.parametrize("mode", ["raise", "ignore"])
def test_sigterm_ends_cleanly_even_when_closing_the_generator_fails(tmp_path: Path, mode: str) -> None:
    with gunicorn(tmp_path=tmp_path, env={"GUNICORN_GRACEFUL_TIMEOUT": "20"}) as srv:
        body = json.dumps({"mode": mode}).encode()
        sock = open_stream(srv, "/bad_close", body)
        sock.settimeout(10)
        read_until(sock, b"data: 1000\n\n")
        os.kill(srv.process.pid, signal.SIGTERM)
        rest = read_until(sock, b"\r\n0\r\n\r\n")
        sock.close()
        assert b"event: shutdown\ndata: \n\n" in rest
        assert rest.endswith(b"\r\n0\r\n\r\n")  # the final chunk: the body was ended, not cut
        assert srv.process.wait(timeout=10) == 0
        log = srv.log()
    assert log.count("closing the generator failed") == 1
    assert "Error handling request" not in log


def test_a_client_that_stops_reading_is_ended_after_the_send_timeout(tmp_path: Path) -> None:
    config = {"SSE_RUN_SEND_TIMEOUT": 1, "SSE_RUN_KEEPALIVE": 0}
    with gunicorn(tmp_path=tmp_path, config=config) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        sock.connect(("127.0.0.1", srv.port))
        body = b'{"size": 10000}'
        sock.sendall(
            b"POST /endless HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        # Never read: the server's writes block once the buffers are full, and the stream ends
        # where its write waits, about a second later, as a failed write would end it.
        took = wait_for(lambda: stats(srv)["endless_finally"] == 1, timeout=20)
        sock.close()
        assert stats(srv)["endless_disconnected"] == 1
        assert took < 15  # not never: without the timeout the write waits as long as the client
        log = srv.log()
    assert "Traceback" not in log and "Error handling request" not in log


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip (iproute2) to make a network namespace",
)
def test_a_client_whose_network_vanishes_is_ended_after_the_send_timeout(tmp_path: Path) -> None:
    # A real cut: server and client in a network namespace of their own whose loopback goes
    # down mid-stream, so no FIN or RST ever arrives; only unacknowledged pings tell.
    result = subprocess.run(
        ["unshare", "-n", sys.executable, str(ROOT / "tests/scripts/network_cut.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # SSE_RUN_SEND_TIMEOUT is 2 s and a ping is due 0.5 s into the silence: ended seconds after
    # the cut, not the quarter of an hour Linux's retransmissions would take.
    assert seen["finally"] == 1 and seen["disconnected"] == 1, seen
    assert seen["ended_after_cut"] < 30, seen
