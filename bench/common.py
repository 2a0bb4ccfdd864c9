"""Helpers shared by the LLM benchmarks (the GPU one included: nothing here imports torch)."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable

__all__ = ["in_threads", "percentile"]


def in_threads(count: int, target: Callable[[int], object]) -> None:
    """Run ``target(0)`` ... ``target(count - 1)`` in as many threads at once; return when all
    have ended."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile (1-99) of ``values``, interpolated as numpy's default."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1]
