"""Benchmark: channels (``sse.publish`` and ``GET /channels/<name>``) on Redis, beside Flask-SSE.

Run from the repository root:  python -m bench.bench_channels [--subscribers N] [--quick]

Every server is ``gunicorn -k gevent -w 1`` (``gunicorn.conf.py``) on one ``redis-server`` this
script starts on a free port: flask-sse-run's ``bench.channel_apps:channels_app()``, and
Flask-SSE 1.0.0's blueprint (``bench.channel_apps:flask_sse_app()``), which holds one Redis
pub/sub connection per client. Subscribers are raw sockets on one epoll loop in two processes
of their own (:mod:`bench.channel_clients`: they count events, parse nothing); events are
published with each library's ``sse.publish`` from a process of its own (an app context, as a
job would). For one channel with N subscribers in the worker (10,000 for flask-sse-run, and
1,000 for both libraries side by side), it prints:

* latency from the publish call to the last subscriber's read of the event, p50 / p99 (and of
  every delivery), at a steady rate of events;
* the worker's CPU (``/proc/<pid>/stat``, user + system) per delivered event at that rate, and
  Redis's;
* delivered events/s: a burst of events published back to back, all deliveries over the time
  from the first publish to the last read;
* publishes/s of a loop of ``sse.publish`` in the publisher's process (3 s), with no subscriber
  and with the N subscribers connected; after the second (a flood of thousands of events), how
  long until every subscriber has read one more event, and the worker's and Redis's peak memory
  meanwhile;
* the worker's RSS with 0 and with N idle subscribers, per subscriber;
* Redis's ``connected_clients`` with the N subscribers (less this script's own connection; the
  publisher's are counted), and how many of them are the worker's (its sockets in ``/proc``).

The server, Redis, the subscribers and the publisher share this machine's cores: each figure is
what one worker does while everything else runs beside it. Flask-SSE is optional: without it
the script says how to install it and measures flask-sse-run alone.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_runtime import rss_kib, serve
from bench.channel_apps import FLASK_SSE, Publisher
from bench.channel_clients import MARKER, Subscribers, deliveries
from tests.live import ROOT, Server
from tests.redis_server import RedisServer

CHANNEL = "bench"
OURS, THEIRS = "flask-sse-run", "Flask-SSE"
APPS = {OURS: "bench.channel_apps:channels_app()", THEIRS: "bench.channel_apps:flask_sse_app()"}
PATHS = {OURS: f"/channels/{CHANNEL}", THEIRS: f"/stream?channel={CHANNEL}"}
INSTALL = (
    "Flask-SSE is not installed: the comparison is skipped. Install it beside the environment with\n"
    f"  pip install --no-deps --target {FLASK_SSE} flask-sse==1.0.0 six\n"
    "(or `pip install flask-sse==1.0.0`; BENCH_FLASK_SSE_PATH names another --target folder)"
)


def flask_sse_found() -> bool:
    """Whether the Flask-SSE server can import ``flask_sse`` (installed, or in FLASK_SSE)."""
    import importlib.util

    return importlib.util.find_spec("flask_sse") is not None or (Path(FLASK_SSE) / "flask_sse.py").exists()


def request_for(library: str) -> bytes:
    return (f"GET {PATHS[library]} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n").encode()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far (as bench_redis reads it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pid(server: Server) -> int:
    """The pid of the gunicorn master's only worker."""
    master = server.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"gunicorn has {len(children)} workers, not one")
    return int(children[0])


@dataclass
class Round:
    """One measured round of publishes: what the subscribers read, and what it cost."""

    events: int
    subscribers: int
    delivered: int = 0
    elapsed: float = 0.0  # first publish -> last read
    last: list[float] = field(default_factory=list)  # per event: publish -> last subscriber
    every: list[float] = field(default_factory=list)  # per delivery
    worker_cpu: float = 0.0
    redis_cpu: float = 0.0
    complete: bool = False
    dropped: int = 0  # subscribers whose stream ended (closed by the server)

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed if self.elapsed else 0.0

    def us_per_delivery(self, cpu: float) -> float:
        return cpu / self.delivered * 1e6 if self.delivered else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


class Bench:
    """One server of ``library`` on ``store``, its subscribers and its publisher."""

    def __init__(self, library: str, store: RedisServer, stack: ExitStack, procs: int) -> None:
        self.library = library
        self.store = store
        env = {"BENCH_REDIS_URL": store.url, "GUNICORN_WORKER_CONNECTIONS": "20000"}
        if library == THEIRS:
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), FLASK_SSE])
        self.server = stack.enter_context(serve(APPS[library], **env))
        self.pid = worker_pid(self.server)
        self.publisher = Publisher("flask-sse" if library == THEIRS else "ours", store.url, CHANNEL)
        stack.callback(self.publisher.stop)
        self.clients = [Subscribers() for _ in range(procs)]
        for clients in self.clients:
            stack.callback(clients.close)
        self.subscribers = 0
        import redis

        self.redis = redis.Redis.from_url(store.url)
        stack.callback(self.redis.close)

    def redis_clients(self) -> int:
        """Redis's connected clients, less this script's own connection."""
        return int(self.redis.info("clients")["connected_clients"]) - 1

    def worker_connections(self) -> int:
        """The worker's open TCP connections to Redis (its sockets, in ``/proc/net/tcp``)."""
        inodes = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        count = 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()  # sl, local, remote, state, ..., inode (10th)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            count += fields[3] == "01" and remote_port == self.store.port and fields[9] in inodes
        return count

    def connect(self, count: int, timeout: float = 120) -> None:
        """``count`` more subscribers, spread over the client processes; back once each is
        subscribed (flask-sse-run: its stream's first block read; Flask-SSE, which sends nothing
        before the first event: Redis counts its subscription)."""
        share, extra = divmod(count, len(self.clients))
        for index, clients in enumerate(self.clients):
            clients.connect(self.server.port, request_for(self.library), share + (index < extra))
        self.subscribers += count
        deadline = time.monotonic() + timeout
        while True:
            found = [clients.status() for clients in self.clients]
            if any(each["errors"] or each["closed"] for each in found):
                raise RuntimeError(f"subscribers failed: {found}")
            if self.library == OURS:
                ready = sum(each["primed"] for each in found)
            else:
                ready = int(self.redis.pubsub_numsub(CHANNEL)[0][1])
            if ready >= self.subscribers and not any(each["pending"] for each in found):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ready} of {self.subscribers} subscribed in {timeout} s: {found}")
            time.sleep(0.1)

    def redis_cpu(self) -> float:
        assert self.store.process is not None
        return cpu_seconds(self.store.process.pid)

    def round(self, events: int, rate: float | None, timeout: float = 90) -> Round:
        """Publish ``events`` at ``rate`` a second (``None``: back to back) and wait until every
        subscriber has read them all (or ``timeout``)."""
        for clients in self.clients:
            clients.record()
        worker, redis = cpu_seconds(self.pid), self.redis_cpu()
        published = self.publisher.paced(events, rate)
        deadline = time.monotonic() + timeout
        result = Round(events, self.subscribers)
        while time.monotonic() < deadline:
            found = [clients.status() for clients in self.clients]
            result.dropped = sum(each["closed"] for each in found)
            if all(each["least"] >= events for each in found):
                result.complete = not result.dropped
                break
            time.sleep(0.02)
        result.worker_cpu = cpu_seconds(self.pid) - worker
        result.redis_cpu = self.redis_cpu() - redis
        records = [clients.collect() for clients in self.clients]
        result.last, result.every, latest = deliveries(records, published)
        result.delivered = len(result.every)
        result.elapsed = latest - published[0]
        return result

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def flood(self, seconds: float, figures: Figures, timeout: float = 60) -> None:
        """A loop of publishes for ``seconds`` with every subscriber connected, then one marked
        event: how long until every subscriber has read it, and the worker's and Redis's peak
        memory meanwhile (sampled every 0.2 s)."""
        for clients in self.clients:
            clients.record()
        rss, memory = self.rss_kib(), 0

        def sample() -> None:
            nonlocal rss, memory
            rss = max(rss, self.rss_kib())
            memory = max(memory, int(self.redis.info("memory")["used_memory"]))

        self.publisher.start_loop(seconds)
        while (found := self.publisher.loop_result(0.2)) is None:
            sample()
        figures.publish_with, figures.flood_events = found
        self.publisher.mark(MARKER.decode())
        ended = time.monotonic()
        while time.monotonic() - ended < timeout:
            status = [clients.status() for clients in self.clients]
            figures.flood_dropped = sum(each["closed"] for each in status)
            if sum(each["marked"] for each in status) + figures.flood_dropped >= self.subscribers:
                figures.caught_up = time.monotonic() - ended
                break
            sample()
            time.sleep(0.2)
        sample()
        figures.flood_rss, figures.flood_redis = rss, memory


@dataclass
class Figures:
    """What one library did with one count of subscribers."""

    library: str
    subscribers: int
    publish_alone: float = 0.0
    publish_with: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    redis_clients: int = 0
    paced: Round | None = None
    burst: Round | None = None
    rate: float = 0.0
    flood_events: int = 0
    worker_connections: int = 0
    caught_up: float | None = None  # None: not within the timeout
    flood_dropped: int = 0
    flood_rss: int = 0  # KiB
    flood_redis: int = 0  # bytes

    @property
    def kib_per_subscriber(self) -> float:
        return (self.rss_after - self.rss_before) / self.subscribers


def measure(
    library: str, store: RedisServer, subscribers: int, *, rate: float, events: int, burst: int,
    procs: int, publish_seconds: float,
) -> Figures:  # fmt: skip
    """Every figure of ``library`` with ``subscribers`` on one channel, on a fresh server."""
    figures = Figures(library, subscribers, rate=rate)
    with ExitStack() as stack:
        bench = Bench(library, store, stack, procs)
        bench.publisher.loop(0.5)  # warm-up: the publisher's first calls are its slowest
        figures.publish_alone = bench.publisher.loop(publish_seconds)
        # Warm-up: a few subscribers read a few events (code paths, the channel's feed), then the
        # worker's RSS with them still there stands for "no subscriber".
        bench.connect(len(bench.clients))
        bench.round(5, 50.0)
        figures.rss_before = bench.rss_kib()
        bench.connect(subscribers - len(bench.clients))
        time.sleep(1.0)
        figures.rss_after = bench.rss_kib()
        figures.redis_clients = bench.redis_clients()
        figures.worker_connections = bench.worker_connections()
        figures.paced = bench.round(events, rate)
        figures.burst = bench.round(burst, None)
        bench.flood(publish_seconds, figures)
    return figures


def ms(values: list[float]) -> str:
    """``p50 / p99`` of ``values`` (seconds) in ms."""
    return f"{pct(values, 0.5):.1f} / {pct(values, 0.99):.1f}"


def us(cpu: float, result: Round) -> str:
    return f"{result.us_per_delivery(cpu):.2f}"


def caught_up(figures: Figures) -> str:
    return "more than 60 s" if figures.caught_up is None else f"{figures.caught_up:.1f} s"


def short(result: Round) -> str:
    """What a round left out: nothing, or how many deliveries of how many came."""
    if result.complete:
        return ""
    expected = result.events * result.subscribers
    return f" (INCOMPLETE: {result.delivered:,} of {expected:,}, {result.dropped} streams ended)"


def report(figures: Figures) -> None:
    paced, burst = figures.paced, figures.burst
    assert paced is not None and burst is not None
    print(f"\n{figures.library}, {figures.subscribers:,} subscribers")
    print(f"  {paced.events} events at {figures.rate:g}/s{short(paced)}:")
    print(
        f"    publish -> last subscriber p50 / p99 {ms(paced.last)} ms; every delivery {ms(paced.every)} ms"
    )
    print(
        f"    CPU per delivered event: worker {us(paced.worker_cpu, paced)} us,"
        f" Redis {us(paced.redis_cpu, paced)} us"
    )
    print(
        f"  {burst.events} events back to back{short(burst)}: {burst.rate:,.0f} deliveries/s"
        f" ({burst.elapsed:.2f} s); per delivery: worker {us(burst.worker_cpu, burst)} us,"
        f" Redis {us(burst.redis_cpu, burst)} us"
    )
    print(
        f"  publishes/s of a loop of sse.publish: {figures.publish_alone:,.0f} with no subscriber,"
        f" {figures.publish_with:,.0f} with the {figures.subscribers:,} ({figures.flood_events:,} events)"
    )
    print(
        f"  after that loop, every subscriber read one more event in {caught_up(figures)}"
        f" ({figures.flood_dropped} streams ended); peaks meanwhile: worker RSS"
        f" {figures.flood_rss / 1024:,.0f} MiB, Redis used_memory {figures.flood_redis / 2**20:,.0f} MiB"
    )
    print(
        f"  worker RSS {figures.rss_before / 1024:.1f} -> {figures.rss_after / 1024:.1f} MiB:"
        f" {figures.kib_per_subscriber:.1f} KiB per subscriber;"
        f" Redis connected_clients {figures.redis_clients:,} ({figures.worker_connections:,} the worker's)"
    )


def table(results: list[Figures]) -> None:
    """The figures as a Markdown table, a column per row of the plan."""
    heads = [f"{f.library}, {f.subscribers:,} subscribers" for f in results]
    print("\n| measure | " + " | ".join(heads) + " |")
    print("| --- |" + " --- |" * len(results))
    rows: list[tuple[str, Any]] = [
        ("steady rate: events/s (deliveries/s)", lambda f: f"{f.rate:g} ({f.rate * f.subscribers:,.0f})"),
        ("publish -> last subscriber p50 / p99, ms", lambda f: ms(f.paced.last) + short(f.paced)),
        ("publish -> each delivery p50 / p99, ms", lambda f: ms(f.paced.every)),
        ("worker CPU per delivered event, us", lambda f: us(f.paced.worker_cpu, f.paced)),
        ("Redis CPU per delivered event, us", lambda f: us(f.paced.redis_cpu, f.paced)),
        ("burst: delivered events/s", lambda f: f"{f.burst.rate:,.0f}" + short(f.burst)),
        ("burst: worker CPU per delivered event, us", lambda f: us(f.burst.worker_cpu, f.burst)),
        ("publishes/s, no subscriber", lambda f: f"{f.publish_alone:,.0f}"),
        ("publishes/s, the subscribers connected", lambda f: f"{f.publish_with:,.0f}"),
        ("after that loop: every subscriber read one more event in", caught_up),
        ("... streams ended", lambda f: f"{f.flood_dropped:,}"),
        (
            "... peak worker RSS / Redis used_memory, MiB",
            lambda f: f"{f.flood_rss / 1024:,.0f} / {f.flood_redis / 2**20:,.0f}",
        ),
        ("worker memory per idle subscriber, KiB", lambda f: f"{f.kib_per_subscriber:.1f}"),
        (
            "Redis connections: the worker's / connected_clients",
            lambda f: f"{f.worker_connections:,} / {f.redis_clients:,}",
        ),
    ]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(f) for f in results) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=10_000, help="flask-sse-run's large count")
    parser.add_argument("--compare", type=int, default=1_000, help="subscribers of both libraries")
    parser.add_argument("--quick", action="store_true", help="500 and 200 subscribers, short rounds")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    big, small = (500, 200) if args.quick else (args.subscribers, args.compare)
    if big + 1000 > hard:
        sys.exit(f"{big:,} subscribers need more open files than the hard limit ({hard}): see ulimit -Hn")
    seconds = 1.0 if args.quick else 3.0
    theirs = flask_sse_found()
    if not theirs:
        print(INSTALL)
    started, load = time.monotonic(), os.getloadavg()[0]
    results: list[Figures] = []
    # (library, subscribers, steady events/s, events at that rate, events of the burst)
    if args.quick:
        plan = [(OURS, big, 2.0, 10, 50), (OURS, small, 5.0, 20, 50), (THEIRS, small, 5.0, 20, 50)]
    else:
        plan = [(OURS, big, 1.0, 40, 100), (OURS, small, 5.0, 100, 100), (THEIRS, small, 5.0, 100, 100)]
    if big == small:
        del plan[1]
    if not theirs:
        plan = [row for row in plan if row[0] != THEIRS]
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as store:
        for library, count, rate, events, burst in plan:
            figures = measure(
                library, store, count, rate=rate, events=events, burst=burst, procs=2,
                publish_seconds=seconds,
            )  # fmt: skip
            report(figures)
            results.append(figures)
            store_flush(store)
    table(results)
    took = time.monotonic() - started
    print(f"\n({took:.0f} s; load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")


def store_flush(store: RedisServer) -> None:
    """Empty Redis between servers (the channel's history would otherwise carry over)."""
    import redis

    client = redis.Redis.from_url(store.url)
    client.flushall()
    client.close()


if __name__ == "__main__":
    main()
