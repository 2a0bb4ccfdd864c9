"""The channel live tests' app: channels on the Redis that ``CHANNEL_APP_REDIS_URL`` names.

Served as ``tests.channel_app:create_app()`` by gunicorn, made again in a plain process that
publishes (as an RQ or Celery job would), and found by ``flask --app tests.channel_app sse
publish``. ``TEST_APP_CONFIG`` (JSON, set by ``tests.live.gunicorn``) adds config.

- ``POST /progress`` (``channel``, ``n``, ``interval``): a generator that publishes each step
  on ``channel`` as a ``progress`` event (``{"step": i, "of": n}``) and yields it too.
- ``GET /page``: a page whose ``EventSource`` follows the channels its query names
  (``?channel=a&channel=b``) at ``channels?...``, and keeps what it received in
  ``window.received`` for the test to read.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response

from flask_sse_run import SSERun

sse = SSERun()

#: The channel settings every server of the tests shares (``create_app``'s ``config`` adds).
DEFAULTS: dict[str, Any] = {
    "SSE_RUN_REDIS_PREFIX": "channels:",
    "SSE_RUN_KEEPALIVE": 1,
}


@sse.function
def progress(channel: str, n: int, interval: float = 0.05) -> Iterator[dict[str, int]]:
    """Publish ``n`` steps on ``channel`` (``progress`` events), yielding each as well."""
    for i in range(n):
        step = {"step": i, "of": n}
        sse.publish(channel, step, event="progress")
        yield step
        if interval:
            time.sleep(interval)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>channels</title><link rel="icon" href="data:,"></head>
<body><pre id="log"></pre>
<script>
  // What arrived, as [type, lastEventId, data]; opens and connection errors counted.
  window.received = [];
  window.opens = 0;
  window.errors = 0;
  const source = new EventSource("channels" + location.search);
  const keep = (e) => window.received.push([e.type, e.lastEventId, e.data]);
  source.onmessage = keep;
  source.addEventListener("missed", keep);
  source.addEventListener("error", (e) => {
    if (e instanceof MessageEvent) keep(e);  // the server's error event
    else window.errors += 1;  // the connection's: EventSource reconnects by itself
  });
  source.onopen = () => { window.opens += 1; };
  window.source = source;
</script></body></html>
"""


def create_app(**config: Any) -> Flask:
    """The app: ``progress``, ``/page``, and the channels at ``/channels``."""
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    url = os.environ.get("CHANNEL_APP_REDIS_URL")
    if url:
        app.config["SSE_RUN_REDIS_URL"] = url
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)

    @app.get("/page")
    def page() -> Response:
        return Response(PAGE, mimetype="text/html")

    sse.init_app(app)
    return app
