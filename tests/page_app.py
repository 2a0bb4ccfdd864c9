"""The browser test's app: the example page, and a ``run`` that counts how often it runs.

``run`` is the example app's (one ``"Number i "`` a second, resumable, served with GET), plus
counters in ``GET /stats``: the test reads there, from outside the browser, that a reconnect
followed the run instead of running the function again. Served as
``tests.page_app:create_app()``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Flask

from example_app.page import page
from flask_sse_run import SSERun

sse = SSERun()

RUNS = {"started": 0, "finished": 0}


@sse.function(resumable=True, methods=("GET", "POST"))
def run(upper_range: int) -> Iterator[str]:
    """Count to ``upper_range``, one number a second, counting starts and ends."""
    RUNS["started"] += 1
    try:
        for i in range(upper_range):
            yield f"Number {i} "
            time.sleep(1)
    finally:
        RUNS["finished"] += 1


def create_app() -> Flask:
    """The page at ``GET /``, ``run`` at ``/run`` and the counters at ``GET /stats``."""
    app = Flask(__name__)

    @app.get("/stats")
    def stats() -> dict[str, int]:
        return dict(RUNS)

    app.register_blueprint(page)
    sse.init_app(app)
    return app
