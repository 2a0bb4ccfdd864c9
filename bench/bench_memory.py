"""Benchmark: what a worker's resumable runs cost in memory, and whether it comes back.

Run from the repository root:  python -m bench.bench_memory [--runs 600] [--event-size 4096]

One ``gunicorn -k gevent -w 1`` serving ``bench.apps:extension_app()`` on the in-process store
(``SSE_RUN_RESUME_TTL`` 10 s), for each setting of ``SSE_RUN_MAX_BYTES`` (off: 1 TiB; the
default, 256 MiB): ``--runs`` detached runs (``Prefer: respond-async``) of a generator that makes
4 MiB as fast as it is taken (each run holds its last ``SSE_RUN_RESUME_MAX_BYTES``, 1 MiB),
started one after another; with the janitor's ``malloc_trim`` off (as glibc leaves the heap)
and on (the default). It prints the worker's RSS (``/proc/<pid>/status``) before, at its peak,
once every run has ended (held for the TTL), once they expired (and ``TRIM_EVERY`` more
seconds), and after glibc's ``malloc_trim(0)`` called in the worker by the benchmark (with how
long the call held it); the answers to the starts (503: refused) and the bytes the store
counted.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import requests

from bench.bench_runtime import rss_kib, serve, stats
from flask_sse_run.runs.runtime import TRIM_EVERY
from tests.live import Server

APP = "bench.apps:extension_app()"
TTL = 10.0
MIB = 1 << 20


def _memory(server: Server) -> dict[str, Any]:
    return requests.get(f"{server.url}/memory", timeout=30).json()  # type: ignore[no-any-return]


def _wait(server: Server, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = _memory(server)
        if done(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def measure(
    budget: int,
    janitor_trim: bool,
    runs: int,
    run_bytes: int,
    event_size: int,
    pythonmalloc: str | None = None,
) -> dict[str, Any]:
    """One worker, ``runs`` detached runs of ``run_bytes``: its RSS along the way (MiB)."""
    config = {"SSE_RUN_RESUME_TTL": TTL, "SSE_RUN_MAX_BYTES": budget, "SSE_RUN_MAX_RUNS": 100_000}
    env = {"TEST_APP_CONFIG": json.dumps(config), "BENCH_JANITOR_TRIM": "1" if janitor_trim else "0"}
    if pythonmalloc is not None:
        env["PYTHONMALLOC"] = pythonmalloc
    with serve(APP, **env) as server:
        pid = stats(server)["pid"]
        body = {"n": max(1, run_bytes // event_size), "size": event_size}
        session = requests.Session()
        # One run first: what the first request of each kind imports and builds is not counted.
        detached = {"Prefer": "respond-async"}
        session.post(f"{server.url}/blob_resumable", json={"n": 1, "size": 1}, headers=detached, timeout=60)
        _wait(server, lambda m: m["runs"] == 0, TTL + 5)
        before = rss_kib(pid)
        peak = [before]
        sampling = True

        def sample() -> None:
            while sampling:
                peak[0] = max(peak[0], rss_kib(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        statuses: dict[int, int] = {}
        started = time.monotonic()
        for _ in range(runs):
            response = session.post(f"{server.url}/blob_resumable", json=body, headers=detached, timeout=60)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        ended = _wait(server, lambda m: m["producers"] == 0, 600)
        took = time.monotonic() - started
        held = rss_kib(pid)
        expired = _wait(server, lambda m: m["runs"] == 0, TTL + 30)
        time.sleep(TRIM_EVERY + 1.0)  # the janitor's next malloc_trim, if any
        sampling = False
        sampler.join()
        after = rss_kib(pid)
        trim = session.post(f"{server.url}/malloc_trim", timeout=60).json()
        return {
            "budget_mib": budget / MIB,
            "statuses": statuses,
            "seconds": round(took, 1),
            "held_mib": round((ended["held_bytes"] or 0) / MIB, 1),
            "runs_held": ended["runs"],
            "rss_before_mib": round(before / 1024),
            "rss_peak_mib": round(peak[0] / 1024),
            "rss_all_ended_mib": round(held / 1024),
            "rss_expired_mib": round(after / 1024),
            "runs_left": expired["runs"],
            "rss_after_malloc_trim_mib": round(trim["after_kib"] / 1024),
            "malloc_trim_ms": round(trim["ms"], 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--run-mib", type=int, default=4, help="what each run makes (MiB)")
    parser.add_argument("--event-size", type=int, default=4096, help="characters per event")
    parser.add_argument("--pythonmalloc", help="PYTHONMALLOC for the worker (malloc: no pymalloc arenas)")
    args = parser.parse_args()
    cases = (
        ("SSE_RUN_MAX_BYTES off (1 TiB), no janitor malloc_trim", 1 << 40, False),
        ("SSE_RUN_MAX_BYTES 256 MiB, no janitor malloc_trim", 256 * MIB, False),
        ("SSE_RUN_MAX_BYTES 256 MiB, janitor malloc_trim (the default)", 256 * MIB, True),
    )
    for label, budget, janitor_trim in cases:
        result = measure(
            budget, janitor_trim, args.runs, args.run_mib * MIB, args.event_size, args.pythonmalloc
        )
        print(f"{label}, {args.runs} runs of {args.run_mib} MiB in events of {args.event_size} B:")
        print("  " + json.dumps(result))


if __name__ == "__main__":
    main()
