"""Measure another endpoint's latency while something else runs (tests and benchmarks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests


@contextmanager
def polled_latencies(url: str, interval: float = 0.01) -> Iterator[list[float]]:
    """GET ``url`` every ``interval`` seconds during the block; the list fills with latencies (s).

    Each response must be a 2xx; one keep-alive connection is reused, as a load balancer would.
    """
    latencies: list[float] = []
    done = threading.Event()
    failures: list[BaseException] = []

    def poll() -> None:
        try:
            with requests.Session() as session:
                while not done.is_set():
                    began = time.perf_counter()
                    session.get(url, timeout=10).raise_for_status()
                    latencies.append(time.perf_counter() - began)
                    time.sleep(interval)
        except BaseException as exc:  # re-raised in the caller's thread
            failures.append(exc)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield latencies
    finally:
        done.set()
        poller.join()
    if failures:
        raise failures[0]
