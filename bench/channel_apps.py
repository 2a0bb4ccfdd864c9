"""The two servers ``bench_channels`` compares, and its publisher process.

``channels_app()``: flask-sse-run, whose channels are served at ``GET /channels/<name>``.
``flask_sse_app()``: Flask-SSE 1.0.0 (``pip install flask-sse==1.0.0``), its blueprint at
``/stream`` (``?channel=<name>``). Both read the Redis URL from ``BENCH_REDIS_URL``. Nothing
here imports ``flask_sse`` until a Flask-SSE app or publisher is made (it is optional).

:class:`Publisher`: a process of its own that makes the app and publishes with the library's
own call in an app context (``sse.publish``), as a job or another web process would.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from typing import Any

from flask import Flask

__all__ = ["FLASK_SSE", "Publisher", "channels_app", "flask_sse_app"]

#: Where the bench finds Flask-SSE when it is not installed in the environment
#: (``pip install --no-deps --target /tmp/flasksse flask-sse==1.0.0``); ``BENCH_FLASK_SSE_PATH``
#: names another folder.
FLASK_SSE = os.environ.get("BENCH_FLASK_SSE_PATH", "/tmp/flasksse")


def channels_app() -> Flask:
    from flask_sse_run import SSERun

    app = Flask(__name__)
    app.config["SSE_RUN_REDIS_URL"] = os.environ["BENCH_REDIS_URL"]
    SSERun(app)
    return app


def flask_sse_app() -> Flask:
    from flask_sse import sse  # type: ignore[import-not-found]

    app = Flask(__name__)
    app.config["REDIS_URL"] = os.environ["BENCH_REDIS_URL"]
    app.register_blueprint(sse, url_prefix="/stream")
    return app


def _publish_loop(library: str, redis_url: str, channel: str, control: Any) -> None:
    """The publisher process: one app, then the parent's commands on ``control``."""
    os.environ["BENCH_REDIS_URL"] = redis_url
    if library == "flask-sse":
        sys.path.append(FLASK_SSE)
        from flask_sse import sse as flask_sse

        app = flask_sse_app()

        def publish(data: dict[str, Any]) -> None:
            flask_sse.publish(data, type="tick", channel=channel)

    else:
        from flask_sse_run import SSERun

        app = Flask(__name__)
        app.config["SSE_RUN_REDIS_URL"] = redis_url
        sse = SSERun(app)

        def publish(data: dict[str, Any]) -> None:
            sse.publish(channel, data, event="tick")

    monotonic = time.monotonic
    with app.app_context():
        publish({"seq": -1, "t": monotonic()})  # connections made, scripts loaded
        control.send(None)
        while True:
            command, *args = control.recv()
            if command == "stop":
                return
            if command == "paced":  # `count` events at `rate` a second (None: back to back)
                count, rate = args
                times = []
                started = monotonic()
                for seq in range(count):
                    if rate is not None:
                        delay = started + seq / rate - monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    now = monotonic()
                    times.append(now)
                    publish({"seq": seq, "t": now})
                control.send(times)
            elif command == "loop":  # as many as `seconds` allow: publishes/s and how many
                (seconds,) = args
                count, started = 0, monotonic()
                while monotonic() - started < seconds:
                    publish({"seq": count, "t": monotonic()})
                    count += 1
                control.send((count / (monotonic() - started), count))
            elif command == "mark":  # one event that holds `marker`
                (marker,) = args
                publish({"seq": marker, "t": monotonic()})
                control.send(None)


class Publisher:
    """A process that publishes on ``channel`` with ``library``'s ``sse.publish``."""

    def __init__(self, library: str, redis_url: str, channel: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self.process = context.Process(
            target=_publish_loop, args=(library, redis_url, channel, child), daemon=True
        )
        self.process.start()
        child.close()
        self._control.recv()

    def paced(self, count: int, rate: float | None) -> list[float]:
        """Publish ``count`` events, ``rate`` a second (``None``: back to back); the time
        (``time.monotonic()``) each publish call began."""
        self._control.send(("paced", count, rate))
        return self._control.recv()  # type: ignore[no-any-return]

    def loop(self, seconds: float) -> float:
        """Publishes a second of a loop of ``sse.publish`` for ``seconds``."""
        self.start_loop(seconds)
        found = self.loop_result(None)
        assert found is not None
        return found[0]

    def start_loop(self, seconds: float) -> None:
        """:meth:`loop`, begun: :meth:`loop_result` tells when it is over."""
        self._control.send(("loop", seconds))

    def loop_result(self, timeout: float | None) -> tuple[float, int] | None:
        """The begun loop's publishes a second and how many it made; ``None`` while it runs
        after ``timeout``."""
        if not self._control.poll(timeout):
            return None
        return self._control.recv()  # type: ignore[no-any-return]

    def mark(self, marker: str) -> None:
        """Publish one event whose data holds ``marker``."""
        self._control.send(("mark", marker))
        self._control.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            self._control.send(("stop",))
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
