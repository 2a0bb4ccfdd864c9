"""Steps and tokens per second over the last minute, for a health endpoint.

Pure Python. The decode loop records each step from its thread; a health request reads the
rates on the hub. One-second buckets, the last ``window`` of them kept.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..concurrency import raw_lock

__all__ = ["StepMeter"]


class StepMeter:
    """Count steps and tokens; :meth:`rates` gives their rate over the last ``window`` seconds.

    Before ``window`` seconds have passed since the meter was made, the rate is over the time
    since then, so a server that just started does not report a tenth of its speed.
    """

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._created = clock()
        self._buckets: deque[list[int]] = deque()  # [second, steps, tokens]
        # An OS lock: the loop's thread records while a greenlet (on the hub) reads.
        self._lock = raw_lock()

    def record(self, tokens: int, steps: int = 1) -> None:
        """Count ``steps`` steps that made ``tokens`` tokens, now."""
        second = int(self._clock())
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += steps
                self._buckets[-1][2] += tokens
            else:
                self._buckets.append([second, steps, tokens])
            while self._buckets and self._buckets[0][0] <= second - self.window:
                self._buckets.popleft()

    def rates(self) -> dict[str, float]:
        """``{"steps_per_s", "tokens_per_s"}`` over the last ``window`` seconds."""
        now = self._clock()
        with self._lock:
            recent = [bucket for bucket in self._buckets if bucket[0] >= now - self.window]
        span = max(min(self.window, now - self._created), 1.0)
        return {
            "steps_per_s": round(sum(bucket[1] for bucket in recent) / span, 2),
            "tokens_per_s": round(sum(bucket[2] for bucket in recent) / span, 2),
        }
