"""The two servers the runtime benchmark compares, serving the same generators.

``plain_app()`` is what people write with Flask alone: ``Response(stream_with_context(gen()))``
with hand-formatted ``data:`` lines. ``extension_app()`` serves the same generators with
flask-sse-run. Both expose GET /stats for the benchmark to look inside the worker.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, request, stream_with_context

from flask_sse_run import SSERun
from tests.apps import firehose, worker_stats  # the same never-blocking generator as the tests

STATS = {"finally": 0}


def ticks(n: int, interval: float = 1.0) -> Iterator[str]:
    try:
        for i in range(n):
            yield f"tick {i}"
            time.sleep(interval)
    finally:
        STATS["finally"] += 1


def one() -> Iterator[str]:
    yield "only"


def blob(n: int, size: int) -> Iterator[str]:
    """``n`` events of ``size`` characters, as fast as they are taken (bench_memory)."""
    chunk = "x" * size
    for _ in range(n):
        yield chunk


GENERATORS: dict[str, Callable[..., Iterator[Any]]] = {
    "ticks": ticks, "firehose": firehose, "one": one, "blob": blob,
}  # fmt: skip


def _stats() -> dict[str, Any]:
    return {**STATS, **worker_stats()}


def plain_app() -> Flask:
    app = Flask(__name__)
    app.get("/stats")(_stats)

    def make_view(gen: Callable[..., Iterator[Any]]) -> Callable[[], Response]:
        def view() -> Response:
            kwargs = request.get_json(silent=True) or {}

            def stream() -> Iterator[str]:
                for item in gen(**kwargs):
                    yield f"data: {item}\n\n"

            return Response(stream_with_context(stream()), mimetype="text/event-stream")

        return view

    for name, gen in GENERATORS.items():
        app.add_url_rule(f"/{name}", name, make_view(gen), methods=["POST"])
    return app


def extension_app() -> Flask:
    app = Flask(__name__)
    # The benchmark's settings (SSE_RUN_REDIS_URL ...), as tests.live passes them.
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.get("/stats")(_stats)
    sse = SSERun(app)
    for name, gen in GENERATORS.items():
        sse.function(name=name)(gen)
        # The same generator as a resumable run (bench_runs compares the two).
        sse.function(name=f"{name}_resumable", resumable=True)(gen)
    app.get("/memory")(_memory)
    app.post("/malloc_trim")(_malloc_trim)
    if os.environ.get("BENCH_JANITOR_TRIM") == "0":  # bench_memory: RSS as glibc leaves it
        from flask_sse_run.runs import runtime

        runtime.TRIM_AFTER = 1 << 62
    return app


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _memory() -> dict[str, Any]:
    """What the worker's runs hold, and its RSS (bench_memory)."""
    from flask import current_app

    runs = current_app.extensions["sse_run"].runs
    store = runs.store
    return {
        "rss_kib": _rss_kib(),
        "producers": len(runs.producers),
        "runs": len(store),
        "held_bytes": getattr(store, "nbytes", None),
    }


def _malloc_trim() -> dict[str, Any]:
    """glibc's ``malloc_trim(0)`` in the worker: its RSS before and after, and how long the call
    held the worker (bench_memory)."""
    import ctypes

    before = _rss_kib()
    started = time.perf_counter()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    took = time.perf_counter() - started
    return {"before_kib": before, "after_kib": _rss_kib(), "ms": took * 1000}
