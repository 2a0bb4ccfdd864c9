"""Benchmark: resumable runs vs plain streams of flask-sse-run, and the Redis store vs in-process.

Run from the repository root:  python -m bench.bench_runs [--quick] [--no-redis]

Every server is ``gunicorn -k gevent -w 1`` serving ``bench.apps:extension_app()``, where each
generator is registered twice, plain and resumable. For the in-process store and (unless
``--no-redis``) for the Redis store (a ``redis-server`` this script starts on a free port), it
prints, all in the same run:

* one stream's events/s (a never-blocking generator, read by curl): plain, then resumable;
* first event of 1-event requests on a keep-alive connection, p50/p99;
* concurrent streams at one event a second (5,000, or 1,000 with ``--quick``; 1,000 for
  Redis): failed streams, gap p99 and server memory per stream;
* reconnect latency: a client that had read a run's first event drops and reconnects with
  ``Last-Event-ID``; the time from sending the reconnect to the first replayed event, p50/p99
  (with Redis: on another server than the one producing the run);
* with Redis: Redis's memory per retained event (``used_memory`` before and after runs that
  keep 100,000 events of 60 bytes).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

from bench.bench_runtime import concurrent_streams, first_event_latencies, one_stream_rate, percentile, serve
from tests.live import Server
from tests.redis_server import RedisServer
from tests.sse_clients import run_streams

APP = "bench.apps:extension_app()"


def _request(sock: socket.socket, head: bytes, body: bytes = b"") -> None:
    sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def reconnect_latency(producer: Server, follower: Server, reconnects: int) -> tuple[float, float]:
    """p50/p99 ms from sending a ``Last-Event-ID`` reconnect (to ``follower``) to its first
    replayed event, for runs started on ``producer``."""
    latencies = []
    body = b'{"n": 1000000, "interval": 0.01}'
    for _ in range(reconnects):
        with socket.create_connection(("127.0.0.1", producer.port)) as sock:
            _request(
                sock, b"POST /ticks_resumable HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n", body
            )
            data = b""
            while b"\n\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"the run did not start: {data[:200]!r}")
                data += chunk
            first_id = data.split(b"id: ", 1)[1].split(b"\n", 1)[0]
        time.sleep(0.05)  # the run goes on: a few events wait for the reconnect
        with socket.create_connection(("127.0.0.1", follower.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            # The function's URL and method, as EventSource (GET) or fetch-event-source would.
            sock.sendall(
                b"POST /ticks_resumable HTTP/1.1\r\nHost: x\r\nLast-Event-ID: %s\r\nContent-Length: 0\r\n\r\n"
                % first_id
            )
            data = b""
            while b"\n\n" not in data.partition(b"\r\n\r\n")[2]:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"the reconnect got no event: {data[:200]!r}")
                data += chunk
            latencies.append(time.perf_counter() - started)
        with socket.create_connection(("127.0.0.1", producer.port)) as sock:  # cancel it
            run_id = first_id.split(b":")[0]
            sock.sendall(b"DELETE /runs/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % run_id)
            while sock.recv(65536):
                pass
    return percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000


def _rates(server: Server, suffixes: list[str], rounds: int = 5) -> list[tuple[float, int]]:
    """Median events/s of one stream per path suffix, measured in turns (a shared machine's
    drifting speed weighs on all alike), and how many events its reader missed in all."""
    for suffix in suffixes:
        one_stream_rate(server, 20_000, path=f"/firehose{suffix}")
    rates: list[list[float]] = [[] for _ in suffixes]
    lost: list[list[int]] = [[] for _ in suffixes]
    for _ in range(rounds):
        for rate, missed, suffix in zip(rates, lost, suffixes, strict=True):
            rate.append(one_stream_rate(server, 300_000, path=f"/firehose{suffix}", lost=missed))
    return [(statistics.median(rate), sum(missed)) for rate, missed in zip(rates, lost, strict=True)]


def _latencies(server: Server, suffixes: list[str]) -> list[tuple[float, float]]:
    """First-event latency p50/p99 per path suffix, their requests taken in turns."""
    paths = [f"/one{suffix}" for suffix in suffixes]
    first_event_latencies(server, 200, paths)
    return first_event_latencies(server, 3000, paths)


@contextmanager
def _server(config: dict[str, Any]) -> Iterator[Server]:
    with serve(APP, TEST_APP_CONFIG=json.dumps(config)) as server:
        yield server


def measure(config: dict[str, Any], scale: int, *, plain: bool) -> dict[str, Any]:
    """The measures for one store; ``plain``: the non-resumable ones too."""
    kinds = [("plain", ""), ("resumable", "_resumable")] if plain else [("resumable", "_resumable")]
    row: dict[str, Any] = {kind: {} for kind, _ in kinds}
    with _server(config) as server:
        for (kind, _), (rate, missed) in zip(
            kinds, _rates(server, [suffix for _, suffix in kinds]), strict=True
        ):
            row[kind]["events_per_s"], row[kind]["missed"] = rate, missed
        for (kind, _), latency in zip(
            kinds, _latencies(server, [suffix for _, suffix in kinds]), strict=True
        ):
            row[kind]["latency"] = latency
        with ExitStack() as stack:
            # With a shared store the reconnect goes to another server than the producer's.
            other = stack.enter_context(_server(config)) if "SSE_RUN_REDIS_URL" in config else server
            reconnect_latency(server, other, 20)  # warm-up
            row["reconnect"] = reconnect_latency(server, other, 300)
    for kind, suffix in kinds:
        with _server(config) as server:
            run_streams(server.port, f"/one{suffix}", {}, 20, timeout=10)
            row[kind]["streams"] = concurrent_streams(server, scale, events=10, path=f"/ticks{suffix}")
    return row


def redis_memory_per_event(url: str, events: int = 100_000) -> float:
    """Bytes of Redis memory per retained event of 60 bytes (ids and framing included)."""
    client = redis.Redis.from_url(url)
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    config = {"SSE_RUN_REDIS_URL": url, "SSE_RUN_RESUME_MAX_EVENTS": events}
    with _server(config) as server:
        body = {"n": events, "interval": 0.0}
        run_streams(server.port, "/ticks_resumable", body, 1, timeout=120)
        after = int(client.info("memory")["used_memory"])
    client.close()
    return (after - before) / events


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1,000 streams instead of 5,000")
    parser.add_argument("--no-redis", action="store_true", help="the in-process store only")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scale = 1000 if args.quick else 5000
    memory = measure({}, scale, plain=True)
    memory["resumable"]["reconnect"] = memory["reconnect"]
    print_table("plain stream", memory["plain"], "resumable run, in-process store", memory["resumable"])
    if args.no_redis:
        return
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as store:
        shared = measure({"SSE_RUN_REDIS_URL": store.url}, 1000, plain=False)
        per_event = redis_memory_per_event(store.url)
    shared["resumable"]["reconnect"] = shared["reconnect"]
    print_table(
        "resumable run, in-process store", memory["resumable"],
        "resumable run, Redis store (reconnect on another server)", shared["resumable"],
    )  # fmt: skip
    print(f"\nRedis memory per retained event (60-byte events, 100,000 kept): {per_event:.1f} bytes")


def print_table(left_label: str, left: dict[str, Any], right_label: str, right: dict[str, Any]) -> None:
    """Two columns of figures as a Markdown table (pasted into the README)."""

    def both(get: Any, fmt: str) -> tuple[str, str]:
        return tuple(format(get(side), fmt) if get(side) is not None else "" for side in (left, right))  # type: ignore[return-value]

    def ratio(get: Any) -> str:
        return f"{get(right) / get(left):.2f}x" if get(left) and get(right) else ""

    rows = [
        ("one stream, events/s", lambda c: c["events_per_s"], ",.0f", True),
        ("... events its reader missed, of 5 x 300,000", lambda c: c["missed"], ",d", False),
        ("first event of 1-event requests, p50 ms", lambda c: c["latency"][0], ".3f", True),
        ("first event of 1-event requests, p99 ms", lambda c: c["latency"][1], ".3f", True),
        ("streams at 1 event/s (how many)", lambda c: c["streams"]["clients"], ",d", False),
        ("... failed", lambda c: c["streams"]["failed"], "d", False),
        ("... gap p99, s", lambda c: c["streams"]["gap_p99"], ".3f", False),
        ("... server memory per stream, KiB", lambda c: c["streams"]["kib_per_stream"], ".1f", False),
        (
            "reconnect to first replayed event, p50 ms",
            lambda c: c.get("reconnect", (None, None))[0],
            ".2f",
            False,
        ),
        (
            "reconnect to first replayed event, p99 ms",
            lambda c: c.get("reconnect", (None, None))[1],
            ".2f",
            False,
        ),
    ]
    print(f"\n| measure | {left_label} | {right_label} | ratio |")
    print("| --- | --- | --- | --- |")
    for name, get, fmt, with_ratio in rows:
        cells = both(get, fmt)
        print(f"| {name} | {cells[0]} | {cells[1]} | {ratio(get) if with_ratio else ''} |")


if __name__ == "__main__":
    main()
