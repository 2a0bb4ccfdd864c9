"""The relay's live-test app, served by real gunicorn in both roles ("tests.relay_apps:create_app()").

As the upstream it serves generators that count what they produce and record their ``finally``
(GET /stats shows both from outside). As the relay it serves ``relay_from``, which opens any
upstream URL in the function body (a refusal is then a JSON error before the stream) and relays
its events. Tests bind it to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask

from flask_sse_run import Event, RequestError, SSERun, open_stream, relay
from flask_sse_run.relay import RelayStream

sse = SSERun()

STATS: dict[str, Any] = {"produced": 0, "finally": 0, "last_finally": 0.0}


@sse.function
def relay_from(
    url: str, body: dict[str, Any] | None = None, connect_timeout: float = 5.0, silence_timeout: float = 60.0
) -> RelayStream[str | Event]:
    """Relay the event stream that POSTing ``body`` to ``url`` answers."""
    upstream = open_stream(
        url, json=body or {}, connect_timeout=connect_timeout, silence_timeout=silence_timeout
    )
    return relay(upstream)


@sse.function
def produce(n: int = 0, interval: float = 0.0, size: int = 10, silent_first: float = 0.0) -> Iterator[Event]:
    """``n`` events (0: forever) of ``size`` bytes, numbered by ``id``, ``interval`` s apart."""
    try:
        time.sleep(silent_first)
        i = 0
        while not n or i < n:
            STATS["produced"] += 1
            yield Event(data=f"{i:0{size}d}", id=str(i))
            i += 1
            if interval:
                time.sleep(interval)
    finally:
        STATS["finally"] += 1
        STATS["last_finally"] = time.time()


@sse.function
def mixed() -> Iterator[Any]:
    """Events with every field, a comment, a multi-line and an empty one."""
    yield Event(data="hello", event="greeting", id="1", retry=5000)
    yield Event(comment="just a comment")
    yield ""
    yield "two\nlines"
    yield Event(data="é ☃", id="2")
    yield [1, 2.5, True]


@sse.function
def refuse(status: int) -> Iterator[str]:
    """Refuse with ``status`` before streaming (a 500 when ``status`` is 500: the function fails)."""
    if status == 500:
        raise RuntimeError("failed before streaming")
    raise RequestError(status, f"refused with {status} on purpose", headers={"Retry-After": "3"})


def create_app(**config: Any) -> Flask:
    """The app; ``TEST_APP_CONFIG`` (JSON) adds config when gunicorn builds it."""
    app = Flask(__name__)
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return {**STATS, "pid": os.getpid()}

    sse.init_app(app)
    return app
