"""Benchmark: plain Flask streaming vs flask-sse-run, each under ``gunicorn -k gevent -w 1``.

Run from the repository root:  python -m bench.bench_runtime [--quick]

Prints, for both servers measured in the same run: one-stream events/s, first-event latency
of 1-event requests on a keep-alive connection (p50/p99), and for 1000, 5000 and 10,000
concurrent streams at one event a second: failed streams, gap p99/max and server memory per
stream; then fairness (one never-blocking stream beside 500 slow ones, ``--timeout 5``) and
1000 clients dropping mid-stream (finally blocks run, greenlets/threads/fds left behind).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import re
import resource
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.live import Server, gunicorn
from tests.sse_clients import run_streams

APPS = {"plain Flask": "bench.apps:plain_app()", "flask-sse-run": "bench.apps:extension_app()"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def stats(server: Server) -> dict[str, Any]:
    return requests.get(f"{server.url}/stats", timeout=30).json()  # type: ignore[no-any-return]


@contextmanager
def serve(app: str, **env: str) -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as tmp:
        environment = {"GUNICORN_ACCESSLOG": "/dev/null", "GUNICORN_LOGLEVEL": "warning", **env}
        with gunicorn(app, tmp_path=Path(tmp), env=environment) as server:
            yield server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def one_stream_rate(
    server: Server, events: int, path: str = "/firehose", lost: list[int] | None = None
) -> float:
    """Events/s of one never-blocking stream read by curl; ``lost`` gets how many it missed."""
    started = time.monotonic()
    result = subprocess.run(
        ["curl", "-sS", "-N", "-X", "POST", f"{server.url}{path}", "-H", "Content-Type: application/json",
         "--data", f'{{"n": {events}}}', "-o", "-"],
        capture_output=True, check=True,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    # A resumable run is detached from its reader: a reader that falls more than the run's
    # buffer behind gets a `missed` event for what it lost (each counted here, never silent).
    missed = [int(count) for count in re.findall(rb'^data: \{"missed":(\d+)\}$', result.stdout, re.M)]
    assert result.stdout.count(b"\n\n") - len(missed) + sum(missed) == events
    if lost is not None:
        lost.append(sum(missed))
    return events / elapsed


def _received(sock: socket.socket, data: bytes) -> bytes:
    # A refusal (a 503 when a worker holds its most runs) has no event: say so, never spin.
    chunk = sock.recv(65536)
    if not chunk or not (data + chunk).startswith(b"HTTP/1.1 200"[: len(data + chunk)]):
        raise RuntimeError(f"no event: {(data + chunk)[:300]!r}")
    return chunk


def first_event_latency(server: Server, requests_count: int, path: str = "/one") -> tuple[float, float]:
    """p50/p99 ms from sending a 1-event request on a keep-alive connection to its event."""
    return first_event_latencies(server, requests_count, [path])[0]


def first_event_latencies(server: Server, requests_count: int, paths: list[str]) -> list[tuple[float, float]]:
    """:func:`first_event_latency` for several paths, one keep-alive connection each, their
    requests taken in turns (a shared machine's drifting speed weighs on all alike)."""
    requests_ = [
        b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        % path.encode()
        for path in paths
    ]
    latencies: list[list[float]] = [[] for _ in paths]
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", server.port))) for _ in paths]
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests_count):
            for sock, request, found in zip(socks, requests_, latencies, strict=True):
                started = time.perf_counter()
                sock.sendall(request)
                data = b""
                while b"\n\n" not in data:
                    data += _received(sock, data)
                found.append(time.perf_counter() - started)
                while not data.endswith(b"0\r\n\r\n"):
                    data += _received(sock, data)
    return [(percentile(found, 0.5) * 1000, percentile(found, 0.99) * 1000) for found in latencies]


def concurrent_streams(server: Server, clients: int, events: int, path: str = "/ticks") -> dict[str, Any]:
    pid = stats(server)["pid"]
    before = rss_kib(pid)
    peak = [before]

    import threading

    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak[0] = max(peak[0], rss_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = run_streams(server.port, path, {"n": events, "interval": 1.0}, clients, timeout=events + 30)
    done.set()
    sampler.join()
    ok = [r for r in results if r.status == 200 and r.complete and len(r.event_times) == events]
    gaps = [g for r in ok for g in _gaps(r.started, r.event_times)]
    return {
        "clients": clients,
        "failed": clients - len(ok),
        "gap_p99": percentile(gaps, 0.99),
        "gap_max": max(gaps, default=float("nan")),
        "kib_per_stream": (peak[0] - before) / clients,
    }


def _gaps(started: float, times: list[float]) -> list[float]:
    # Between events only: the first event's wait also counts connection set-up.
    return [b - a for a, b in itertools.pairwise(times)]


def fairness(app: str) -> dict[str, Any]:
    with serve(app, GUNICORN_TIMEOUT="5") as server:
        fast = subprocess.Popen(
            ["curl", "-sS", "-N", "-X", "POST", f"{server.url}/firehose",
             "-H", "Content-Type: application/json", "--data", '{"seconds": 30}', "-o", "/dev/null"],
        )  # fmt: skip
        time.sleep(0.5)
        slow = run_streams(server.port, "/ticks", {"n": 25, "interval": 1.0}, 500, timeout=60)
        fast_rc = fast.wait(timeout=60)
        ok = [r for r in slow if r.status == 200 and r.complete and len(r.event_times) == 25]
        gaps = [g for r in ok for g in _gaps(r.started, r.event_times)]
        return {
            "slow_failed": 500 - len(ok),
            "slow_gap_max": max(gaps, default=float("nan")),
            # The wait for the first event too: a starved worker may accept a stream late.
            "slow_first_max": max((r.event_times[0] - r.started for r in ok), default=float("nan")),
            "fast_exit": fast_rc,
            "worker_timeout": "WORKER TIMEOUT" in server.log(),
        }


def drops(app: str, clients: int) -> dict[str, Any]:
    # SSE_RUN_KEEPALIVE is 15 s by default: the target is finally blocks within 16 s.
    with serve(app) as server:
        run_streams(server.port, "/one", {}, 20, timeout=10)  # warm up lazily made objects
        before = stats(server)
        run_streams(
            server.port, "/ticks", {"n": 600, "interval": 1.0}, clients, timeout=30, drop_after_events=2
        )
        dropped = time.monotonic()
        while time.monotonic() - dropped < 16:
            after = stats(server)
            if after["finally"] - before["finally"] >= clients:
                break
            time.sleep(0.1)
        took = time.monotonic() - dropped
        time.sleep(0.5)
        after = stats(server)
        return {
            "finally_ran": after["finally"] - before["finally"],
            "seconds": took,
            "greenlets_left": after["greenlets"] - before["greenlets"],
            "threads_left": after["threads"] - before["threads"],
            "fds_left": after["fds"] - before["fds"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs (1000 streams only)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 10,000 client sockets

    scales = [1000] if args.quick else [1000, 5000, 10_000]
    rows: dict[str, dict[str, Any]] = {}
    for label, app in APPS.items():
        row: dict[str, Any] = {}
        with serve(app) as server:
            one_stream_rate(server, 20_000)  # warm-up
            row["events_per_s"] = statistics.median(one_stream_rate(server, 500_000) for _ in range(3))
            first_event_latency(server, 200)
            row["latency"] = first_event_latency(server, 3000)
        for clients in scales:
            # A fresh worker for each: memory freed by an earlier run would hide part of this one's.
            with serve(app) as server:
                run_streams(server.port, "/one", {}, 20, timeout=10)  # warm up lazily made objects
                row[clients] = concurrent_streams(server, clients, events=10)
        row["fairness"] = fairness(app)
        row["drops"] = drops(app, 1000)
        rows[label] = row
        print(f"measured {label}", flush=True)

    print_table(rows["plain Flask"], rows["flask-sse-run"], scales)


def print_table(plain: dict[str, Any], ext: dict[str, Any], scales: list[int]) -> None:
    """The figures as a Markdown table (pasted into the README)."""

    def ratio(key: str, index: int | None = None) -> str:
        p, e = (plain[key], ext[key]) if index is None else (plain[key][index], ext[key][index])
        return f"{e / p:.2f}x"

    table = [
        ("one stream, events/s", f"{plain['events_per_s']:,.0f}", f"{ext['events_per_s']:,.0f}",
         ratio("events_per_s")),
        ("first event of 1-event requests, keep-alive connection, p50 ms", f"{plain['latency'][0]:.3f}",
         f"{ext['latency'][0]:.3f}", ratio("latency", 0)),
        ("first event of 1-event requests, keep-alive connection, p99 ms", f"{plain['latency'][1]:.3f}",
         f"{ext['latency'][1]:.3f}", ratio("latency", 1)),
    ]  # fmt: skip
    for clients in scales:
        p, e = plain[clients], ext[clients]
        table += [
            (f"{clients:,} streams at 1 event/s: failed", str(p["failed"]), str(e["failed"]), ""),
            (f"{clients:,} streams: gap p99 / max, s", f"{p['gap_p99']:.3f} / {p['gap_max']:.3f}",
             f"{e['gap_p99']:.3f} / {e['gap_max']:.3f}", ""),
            (f"{clients:,} streams: server memory per stream, KiB", f"{p['kib_per_stream']:.1f}",
             f"{e['kib_per_stream']:.1f}", ""),
        ]  # fmt: skip
    pf, ef = plain["fairness"], ext["fairness"]
    pd, ed = plain["drops"], ext["drops"]
    table += [
        ("30 s never-blocking stream beside 500 at 1 event/s: slow streams' largest gap, s",
         f"{pf['slow_gap_max']:.2f}", f"{ef['slow_gap_max']:.2f}", ""),
        ("... slow streams' longest wait for their first event, s", f"{pf['slow_first_max']:.2f}",
         f"{ef['slow_first_max']:.2f}", ""),
        ("... slow streams failed", str(pf["slow_failed"]), str(ef["slow_failed"]), ""),
        ("... WORKER TIMEOUT with --timeout 5", str(pf["worker_timeout"]), str(ef["worker_timeout"]), ""),
        ("... the fast stream completed (curl exit code)", f"{pf['fast_exit'] == 0} ({pf['fast_exit']})",
         f"{ef['fast_exit'] == 0} ({ef['fast_exit']})", ""),
        ("1000 clients drop mid-stream: finally blocks run (seconds)",
         f"{pd['finally_ran']} ({pd['seconds']:.1f})", f"{ed['finally_ran']} ({ed['seconds']:.1f})", ""),
        ("... greenlets / threads / fds left behind",
         f"{pd['greenlets_left']} / {pd['threads_left']} / {pd['fds_left']}",
         f"{ed['greenlets_left']} / {ed['threads_left']} / {ed['fds_left']}", ""),
    ]  # fmt: skip
    print("\n| measure | plain Flask | flask-sse-run | ratio |")
    print("| --- | --- | --- | --- |")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
