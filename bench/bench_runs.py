"""Benchmark: resumable runs vs plain (non-resumable) streams of flask-sse-run, same server, same run.

Run from the repository root:  python -m bench.bench_runs [--quick]

Each under ``gunicorn -k gevent -w 1`` serving ``bench.apps:extension_app()``, where every
generator is registered twice, plain and resumable. Prints:

* one stream's events/s (a never-blocking generator, read by curl);
* first event of 1-event requests on a keep-alive connection, p50/p99;
* server memory per stream with 5,000 concurrent streams at one event a second;
* reconnect latency: a client that had read the first event of a run drops and reconnects with
  ``Last-Event-ID``; the time from sending the reconnect to the first replayed event, p50/p99.
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import time
from typing import Any

from bench.bench_runtime import concurrent_streams, first_event_latency, one_stream_rate, percentile, serve
from tests.live import Server
from tests.sse_clients import run_streams


def reconnect_latency(server: Server, reconnects: int) -> tuple[float, float]:
    """p50/p99 ms from sending a ``Last-Event-ID`` reconnect to its first replayed event."""
    latencies = []
    body = b'{"n": 1000000, "interval": 0.01}'
    for _ in range(reconnects):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /ticks_resumable HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            data = b""
            while b"\n\n" not in data:
                data += sock.recv(65536)
            first_id = data.split(b"id: ", 1)[1].split(b"\n", 1)[0]
        run_id = first_id.split(b":")[0]
        time.sleep(0.05)  # the run goes on: a few events wait for the reconnect
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            sock.sendall(b"GET /ticks_resumable HTTP/1.1\r\nHost: x\r\nLast-Event-ID: %s\r\n\r\n" % first_id)
            data = b""
            while b"\n\n" not in data.partition(b"\r\n\r\n")[2]:
                data += sock.recv(65536)
            latencies.append(time.perf_counter() - started)
        # Cancel the run so that the next one does not compete with it.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"DELETE /runs/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % run_id)
            while sock.recv(65536):
                pass
    return percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000


def measure(env: dict[str, str], scale: int) -> dict[str, Any]:
    """Every measure, plain then resumable, on fresh workers."""
    row: dict[str, Any] = {}
    with serve("bench.apps:extension_app()", **env) as server:
        for kind, suffix in (("plain", ""), ("resumable", "_resumable")):
            rate = _rate(server, suffix)
            row[kind] = {"events_per_s": rate, "latency": _latency(server, suffix)}
        reconnect_latency(server, 20)  # warm-up
        row["reconnect"] = reconnect_latency(server, 300)
    for kind, suffix in (("plain", ""), ("resumable", "_resumable")):
        with serve("bench.apps:extension_app()", **env) as server:
            run_streams(server.port, f"/one{suffix}", {}, 20, timeout=10)
            row[kind]["streams"] = concurrent_streams(server, scale, events=10, path=f"/ticks{suffix}")
    return row


def _rate(server: Server, suffix: str) -> float:
    one_stream_rate(server, 20_000, path=f"/firehose{suffix}")
    return statistics.median(one_stream_rate(server, 300_000, path=f"/firehose{suffix}") for _ in range(3))


def _latency(server: Server, suffix: str) -> tuple[float, float]:
    first_event_latency(server, 200, path=f"/one{suffix}")
    return first_event_latency(server, 3000, path=f"/one{suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1,000 streams instead of 5,000")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    scale = 1000 if args.quick else 5000
    print_table("in-process store", measure({}, scale), scale)


def print_table(label: str, row: dict[str, Any], scale: int) -> None:
    """The figures as a Markdown table (pasted into the README)."""
    plain, res = row["plain"], row["resumable"]
    table = [
        ("one stream, events/s", f"{plain['events_per_s']:,.0f}", f"{res['events_per_s']:,.0f}",
         f"{res['events_per_s'] / plain['events_per_s']:.2f}x"),
        ("first event of 1-event requests, p50 ms", f"{plain['latency'][0]:.3f}", f"{res['latency'][0]:.3f}",
         f"{res['latency'][0] / plain['latency'][0]:.2f}x"),
        ("first event of 1-event requests, p99 ms", f"{plain['latency'][1]:.3f}", f"{res['latency'][1]:.3f}",
         f"{res['latency'][1] / plain['latency'][1]:.2f}x"),
        (f"{scale:,} streams at 1 event/s: failed", str(plain["streams"]["failed"]),
         str(res["streams"]["failed"]), ""),
        (f"{scale:,} streams: gap p99, s", f"{plain['streams']['gap_p99']:.3f}",
         f"{res['streams']['gap_p99']:.3f}", ""),
        (f"{scale:,} streams: server memory per stream, KiB", f"{plain['streams']['kib_per_stream']:.1f}",
         f"{res['streams']['kib_per_stream']:.1f}", ""),
        ("reconnect to first replayed event, p50 / p99 ms", "",
         f"{row['reconnect'][0]:.2f} / {row['reconnect'][1]:.2f}", ""),
    ]  # fmt: skip
    print(f"\n{label}\n\n| measure | plain stream | resumable run | ratio |")
    print("| --- | --- | --- | --- |")
    for line in table:
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
