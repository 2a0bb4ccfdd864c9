"""Apps the tests serve, in-process and under real gunicorn ("tests.apps:create_app()")."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, current_app, request

from flask_sse_run import Event, SSERun, ThreadChannel, disconnected, iterate_in_thread, run_in_thread

sse = SSERun()

try:  # a sleep that really blocks its OS thread, also under gevent's monkey-patching
    from gevent.monkey import get_original

    blocking_sleep = get_original("time", "sleep")
except ImportError:  # pragma: no cover
    blocking_sleep = time.sleep


@sse.function
def run(upper_range: int) -> Iterator[str]:
    for i in range(upper_range):
        yield f"Number {i} "
        time.sleep(1)


@sse.function
def count(n: int, delay: float = 0.0) -> Iterator[dict[str, int]]:
    for i in range(n):
        yield {"i": i}
        if delay:
            time.sleep(delay)


@sse.function
def fail_after(n: int) -> Iterator[str]:
    for i in range(n):
        yield f"item {i}"
    raise ValueError("boom at the end")


@sse.function
def events() -> Iterator[Any]:
    yield Event(data="hello", event="greeting", id="1", retry=5000)
    yield Event(comment="just a comment")
    yield ""
    yield "two\nlines"
    yield b"bytes \xc3\xa9"
    yield None
    yield [1, 2.5, True]


@sse.function
def whoami() -> Iterator[str]:
    # The request context must still be there while the body streams.
    yield request.headers.get("X-Caller", "nobody")


@sse.function
def plain(a: int, b: int = 2) -> dict[str, int]:
    return {"sum": a + b}


@sse.function
def big(size: int) -> Iterator[str]:
    yield "x" * size


# Counters the live tests read through GET /stats: they show from outside the server that a
# generator's finally ran (and when).
STATS: dict[str, Any] = {
    "started": 0,
    "finally": 0,
    "disconnected_in_finally": 0,
    "cancelled_seen": 0,
    "thread_finally": 0,
    "last_finally": 0.0,
    "thread_items": 0,
    "endless_finally": 0,
    "endless_disconnected": 0,
    "resumable_started": 0,
    "resumable_finally": 0,
    "resumable_cancelled": 0,
    "plain_started": 0,
    "plain_finally": 0,
    "plain_disconnected": 0,
}


@sse.function
def sleeper(seconds: float) -> Iterator[str]:
    STATS["started"] += 1
    try:
        yield "start"
        time.sleep(seconds)
        yield "end"
    finally:
        STATS["finally"] += 1
        STATS["disconnected_in_finally"] += disconnected()
        STATS["last_finally"] = time.time()


@sse.function
def plain_sleeper(seconds: float) -> dict[str, float]:
    """A plain function (no generator) that waits in cooperative I/O before it answers."""
    STATS["plain_started"] += 1
    try:
        time.sleep(seconds)
        return {"slept": seconds}
    finally:
        STATS["plain_finally"] += 1
        STATS["plain_disconnected"] += disconnected()


@sse.function
def watcher(seconds: float) -> Iterator[str]:
    """Blocking work in a real thread that polls disconnected(), the way a GPU loop would."""

    def work(channel: ThreadChannel[str]) -> None:
        channel.send("watching")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if disconnected():
                STATS["cancelled_seen"] += 1
                return
            blocking_sleep(0.02)
        channel.send("done")

    yield from run_in_thread(work)


@sse.function
def blocking_ticks(n: int, interval: float) -> Iterator[int]:
    """A blocking iterator (its sleep holds an OS thread, as file reads or torch would) run
    with iterate_in_thread; STATS["thread_finally"] counts its ends, in the thread."""

    def produce() -> Iterator[int]:
        try:
            for i in range(n):
                blocking_sleep(interval)
                STATS["thread_items"] += 1
                yield i
        finally:
            STATS["thread_finally"] += 1

    yield from iterate_in_thread(produce())


@sse.function
def firehose(n: int = 0, seconds: float = 0.0) -> Iterator[int]:
    """n events, or as many as fit in ``seconds``, as fast as possible: it never blocks, so
    without the runtime's fair slices it would starve the worker."""
    if n:
        yield from range(n)
        return
    deadline, base = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:  # the clock is read once per 1000 events
        yield from range(base, base + 1000)
        base += 1000


@sse.function
def burst_then_wait(n: int, wait: float) -> Iterator[int]:
    # n events without blocking, then a long block: the held events must not wait for it.
    yield from range(n)
    time.sleep(wait)
    yield n


@sse.function
def busy_after_first(seconds: float) -> Iterator[str]:
    # Computes for ``seconds`` without blocking after its first event: that event must not wait.
    yield "first"
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass
    yield "second"


@sse.function
def ticks(n: int, interval: float = 1.0) -> Iterator[float]:
    for _ in range(n):
        yield time.time()
        time.sleep(interval)


@sse.function
def endless(size: int = 1000, interval: float = 0.0) -> Iterator[str]:
    """``size`` characters an event, forever (every ``interval`` seconds, or as fast as the
    client takes them); STATS counts its ends."""
    try:
        while True:
            yield "x" * size
            if interval:
                time.sleep(interval)
    finally:
        STATS["endless_finally"] += 1
        STATS["endless_disconnected"] += disconnected()


@sse.function(resumable=True, methods=("GET", "POST"))
def resumable_ticks(n: int, interval: float = 0.1, tags: list[str] | None = None) -> Iterator[Any]:
    """``n`` numbered ticks, ``interval`` seconds apart, as a resumable run; STATS counts its
    starts and ends (and the ends that were cancellations)."""
    STATS["resumable_started"] += 1
    try:
        for i in range(n):
            yield {"i": i, "tags": tags} if tags else i
            time.sleep(interval)
    finally:
        STATS["resumable_finally"] += 1
        STATS["resumable_cancelled"] += disconnected()


@sse.function(resumable=True, methods=("GET", "POST"))
def shared_ticks(n: int, interval: float = 0.1, label: str = "") -> Iterator[int]:
    """Resumable ticks that count their starts and ends (and cancellations) in the app's Redis,
    under ``tests:<label>:``: what tests read across workers and replicas."""
    import redis

    made = redis.RedisCluster if current_app.config.get("SSE_RUN_REDIS_CLUSTER") else redis.Redis
    counters = made.from_url(current_app.config["SSE_RUN_REDIS_URL"])
    counters.incr(f"tests:{label}:started")
    counters.set(f"tests:{label}:pid", os.getpid())
    try:
        for i in range(n):
            yield i
            time.sleep(interval)
    finally:
        counters.incr(f"tests:{label}:finally")
        if disconnected():
            counters.incr(f"tests:{label}:cancelled")
        counters.close()


@sse.function(resumable=True)
def resumable_fail(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError("the run failed")


@sse.function
def bad_close(mode: str) -> Iterator[int]:
    """Never blocks, and fails when closed: its ``finally`` raises ("raise"), or it catches
    everything around its ``yield`` and yields on ("ignore": "generator ignored GeneratorExit")."""
    i = 0
    try:
        while True:
            try:
                yield i
            except BaseException:
                if mode != "ignore":
                    raise
                yield -1
            i += 1
    finally:
        if mode == "raise":
            raise RuntimeError("cleanup failed")


def worker_stats() -> dict[str, Any]:
    """What a worker holds: the tests and the benchmark compare these before and after."""
    import gc
    import sys

    import greenlet

    return {
        "pid": os.getpid(),
        "greenlets": sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet)),
        "threads": len(sys._current_frames()),  # real OS threads, whatever gevent patched
        "fds": len(os.listdir("/proc/self/fd")),
        "gc_frozen": gc.get_freeze_count(),
        "gc_threshold": list(gc.get_threshold()),
    }


def live_app(name: str, extension: SSERun, stats: Callable[[], dict[str, Any]], **config: Any) -> Flask:
    """An app of the live tests: ``extension``'s functions, ``GET /health`` and ``GET /stats``
    (``stats()``); ``TEST_APP_CONFIG`` (JSON) adds config when gunicorn builds it."""
    app = Flask(name)
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    def stats_view() -> dict[str, Any]:
        return stats()

    extension.init_app(app)
    return app


def create_app(**config: Any) -> Flask:
    """The test app (``tests.apps:create_app()``)."""
    return live_app(__name__, sse, lambda: {**STATS, **worker_stats()}, **config)


def endless_app() -> tuple[Flask, threading.Event, list[bool]]:
    """An app serving ``/endless`` (yields 1 forever), the event set when it is closed, and
    what ``disconnected()`` said in its ``finally``."""
    app = Flask(__name__)
    sse = SSERun(app)
    closed = threading.Event()
    disconnected_in_finally: list[bool] = []

    @sse.function
    def endless() -> Iterator[int]:
        try:
            while True:
                yield 1
        finally:
            disconnected_in_finally.append(disconnected())
            closed.set()

    return app, closed, disconnected_in_finally
