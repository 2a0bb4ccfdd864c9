"""Apps the tests serve, in-process and under real gunicorn ("tests.apps:create_app()")."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, request

from flask_sse_run import Event, SSERun

sse = SSERun()


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


def create_app(**config: Any) -> Flask:
    """The test app; ``TEST_APP_CONFIG`` (JSON) adds config when gunicorn builds it."""
    app = Flask(__name__)
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    sse.init_app(app)
    return app


def endless_app() -> tuple[Flask, threading.Event]:
    """An app serving ``/endless`` (yields 1 forever) and the event set when it is closed."""
    app = Flask(__name__)
    sse = SSERun(app)
    closed = threading.Event()

    @sse.function
    def endless() -> Iterator[int]:
        try:
            while True:
                yield 1
        finally:
            closed.set()

    return app, closed
