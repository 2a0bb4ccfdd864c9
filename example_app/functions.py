"""The functions the example app serves, written as plain Python: ``run`` streams to its caller,
``notify`` publishes on the channel every page follows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

from pydantic import Field

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


@sse.function
def notify(message: Annotated[str, Field(min_length=1, max_length=1000)]) -> str:
    """Publish ``message`` on the channel ``notifications``; return the event's id.

    Every page open on the app shows it in its notifications panel: a channel reaches every
    client that follows it (``GET /channels/notifications``), where a function's stream reaches
    its caller only. ``flask --app wsgi sse publish notifications "hello"`` publishes from a
    shell instead, when the app keeps its channels in Redis (``SSE_RUN_REDIS_URL``).

    Args:
        message: the text to publish, as a plain ``message`` event.
    """
    return sse.publish("notifications", message)
