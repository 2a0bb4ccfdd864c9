"""Benchmark: resumable runs across replicas on the Redis store.

Run from the repository root:  python -m bench.bench_redis [--quick]

Every server is ``gunicorn -k gevent -w 1`` serving ``bench.apps:extension_app()`` on one
``redis-server`` this script starts on a free port. It prints, in one run:

* the worker's CPU per event of 100 resumable streams at 10 events/s for 10 s, through Redis
  and on the in-process store, side by side (the same load, measured in turns);
* the CPU of an idle replica's worker that follows one slow run while another replica serves
  100 streams at 10 events/s (1,000 events/s);
* 1,000, 2,000 and 5,000 Redis-backed streams at one event a second in one worker (2,000 only
  with ``--quick``): failed streams and gap p99;
* one stream's events/s through Redis (a never-blocking generator read by curl);
* how long a follower on another replica takes to learn that the worker producing its run was
  SIGKILLed (the ``ProducerLost`` event), over several kills;
* on a 3-node Redis Cluster (``redis-cli --cluster create``, ``SSE_RUN_REDIS_CLUSTER``): one
  stream's events/s, and the worker's CPU per event of the 100 streams beside a standalone
  Redis's (``--cluster-only``: this part alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from bench.bench_runtime import concurrent_streams, one_stream_rate, serve, stats
from tests.live import Server
from tests.redis_server import RedisCluster, RedisServer
from tests.sse_clients import run_streams
from tests.test_runs_live import Client

APP = "bench.apps:extension_app()"


@contextmanager
def _server(config: dict[str, Any]) -> Iterator[Server]:
    with serve(APP, TEST_APP_CONFIG=json.dumps(config)) as server:
        yield server


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(server: Server, streams: int, seconds: int, rate: int) -> threading.Thread:
    """``streams`` resumable ticking streams, ``rate`` events/s each for ``seconds``, read in a
    thread (started here)."""
    body = {"n": seconds * rate, "interval": 1 / rate}
    thread = threading.Thread(
        target=run_streams,
        args=(server.port, "/ticks_resumable", body, streams),
        kwargs={"timeout": seconds + 30},
    )
    thread.start()
    return thread


def cpu_per_event(server: Server, streams: int = 100, seconds: int = 10, rate: int = 10) -> float:
    """Worker CPU microseconds per delivered event under the load."""
    pid = stats(server)["pid"]
    before = cpu_seconds(pid)
    _load(server, streams, seconds, rate).join()
    return (cpu_seconds(pid) - before) / (streams * seconds * rate) * 1e6


def idle_replica_cpu(url: str, seconds: int = 10) -> float:
    """CPU-s/s of replica A's worker, which follows one slow run, while replica B serves
    1,000 events/s."""
    config = {"SSE_RUN_REDIS_URL": url}
    with _server(config) as a, _server(config) as b:
        follow = threading.Thread(
            target=run_streams,
            args=(a.port, "/ticks_resumable", {"n": seconds + 5, "interval": 1.0}, 1),
            kwargs={"timeout": seconds + 30},
        )
        follow.start()
        time.sleep(1)
        pid = stats(a)["pid"]
        before, started = cpu_seconds(pid), time.monotonic()
        _load(b, 100, seconds, 10).join()
        used = (cpu_seconds(pid) - before) / (time.monotonic() - started)
        follow.join()
    return used


def learn_of_a_dead_producer(url: str, kills: int) -> list[float]:
    """Seconds from SIGKILL of the producing worker to its follower's ``ProducerLost`` event."""
    config = {"SSE_RUN_REDIS_URL": url, "SSE_RUN_KEEPALIVE": 1}
    learned = []
    with _server(config) as a, _server(config) as b:
        for _ in range(kills):
            started = requests.post(
                f"{a.url}/ticks_resumable", json={"n": 100_000, "interval": 0.1},
                headers={"Prefer": "respond-async"}, timeout=10,
            )  # fmt: skip
            response = requests.get(
                f"{b.url}{started.headers['Location']}", headers={"Accept": "text/event-stream"},
                stream=True, timeout=30,
            )  # fmt: skip
            follower = Client(response)
            follower.take(3)
            os.kill(stats(a)["pid"], signal.SIGKILL)
            killed = time.monotonic()
            rest = follower.rest()
            if rest and rest[-1].event == "error" and "ProducerLost" in rest[-1].data:
                learned.append(time.monotonic() - killed)
            deadline = time.monotonic() + 30
            while True:  # gunicorn boots a new worker
                try:
                    if requests.get(f"{a.url}/stats", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.1)
    return learned


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 streams only, 3 kills")
    parser.add_argument("--no-kills", action="store_true", help="skip the dead producer (code with no lease)")
    parser.add_argument("--cluster-only", action="store_true", help="only the Redis Cluster's figures")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not args.cluster_only:
        standalone(args.quick, kills=not args.no_kills)
    cluster_figures()


def cpu_per_event_in_turns(first: dict[str, Any], second: dict[str, Any]) -> tuple[float, float]:
    """Median CPU per event (us) of two servers, measured three times in turns (the machine's
    speed drifts)."""
    measured: tuple[list[float], list[float]] = ([], [])
    with _server(first) as one, _server(second) as other:
        for _ in range(3):
            measured[0].append(cpu_per_event(one))
            measured[1].append(cpu_per_event(other))
    return statistics.median(measured[0]), statistics.median(measured[1])


def resumable_stream_rate(config: dict[str, Any]) -> float:
    """Events/s of one never-blocking resumable stream (median of 3, after a warm-up)."""
    with _server(config) as server:
        one_stream_rate(server, 20_000, "/firehose_resumable")
        return statistics.median(one_stream_rate(server, 100_000, "/firehose_resumable") for _ in range(3))


def cluster_figures() -> None:
    """One stream's events/s through a 3-node cluster, and CPU per event beside standalone."""
    with tempfile.TemporaryDirectory() as tmp, RedisCluster(Path(tmp)) as cluster:
        with RedisServer(Path(tmp)) as single:
            cluster_config = {"SSE_RUN_REDIS_URL": cluster.url, "SSE_RUN_REDIS_CLUSTER": True}
            alone_us, spread_us = cpu_per_event_in_turns({"SSE_RUN_REDIS_URL": single.url}, cluster_config)
        print("\nRedis Cluster of 3 primaries: worker CPU per event, 100 resumable streams at 10 events/s")
        print(f"  standalone Redis: {alone_us:.1f} us   cluster: {spread_us:.1f} us (median of 3, in turns)")
        rate = resumable_stream_rate(cluster_config)
        print(f"  one stream through the cluster (never-blocking generator, curl): {rate:,.0f} events/s")


def standalone(quick: bool, kills: bool) -> None:
    """Every figure on one standalone redis-server."""
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as store:
        redis_config = {"SSE_RUN_REDIS_URL": store.url}
        memory_us, redis_us = cpu_per_event_in_turns({}, redis_config)
        print("Worker CPU per event, 100 resumable streams at 10 events/s for 10 s (median of 3, in turns)")
        ratio = redis_us / memory_us
        print(f"  in-process store: {memory_us:.1f} us   Redis store: {redis_us:.1f} us   ratio {ratio:.2f}x")

        idle = idle_replica_cpu(store.url)
        print("\nIdle replica's worker (follows one slow run) while another serves 1,000 events/s:")
        print(f"  {idle * 100:.1f}% of a CPU")

        print("\nRedis-backed streams in one worker, one event a second for 10 s")
        for clients in [2000] if quick else [1000, 2000, 5000]:
            with _server(redis_config) as server:
                run_streams(server.port, "/one_resumable", {}, 20, timeout=10)
                row = concurrent_streams(server, clients, events=10, path="/ticks_resumable")
            gaps = f"gap p99 {row['gap_p99']:.2f} s, max {row['gap_max']:.2f} s"
            print(f"  {clients:>5} streams: failed {row['failed']}, {gaps}")

        rate = resumable_stream_rate(redis_config)
        print(f"\nOne stream through Redis (never-blocking generator, curl): {rate:,.0f} events/s")

        if not kills:
            return
        learned = learn_of_a_dead_producer(store.url, 3 if quick else 5)
        if learned:
            print(
                "\nA follower on another replica learns of a SIGKILLed producer in "
                f"{statistics.median(learned):.2f} s (median; max {max(learned):.2f} s; {len(learned)} kills)"
            )
        else:
            print("\nA follower never learned of a SIGKILLed producer (no ProducerLost event)")


if __name__ == "__main__":
    main()
