"""The functions the example app serves, written as plain Python."""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask_sse_run import SSERun

sse = SSERun()


@sse.function(resumable=True, methods=("GET", "POST"))
def run(upper_range: int) -> Iterator[str]:
    """Count to ``upper_range``, one number a second (the hosted platform's example).

    Resumable: a client that loses its connection reconnects with ``Last-Event-ID`` and gets
    the rest, without counting again; ``GET /run?upper_range=3`` serves ``EventSource``.

    Args:
        upper_range: how many numbers to send; the stream lasts that many seconds.
    """
    for i in range(upper_range):
        yield f"Number {i} "
        time.sleep(1)
