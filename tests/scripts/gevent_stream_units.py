"""GeventStream under gevent's monkey-patching, without a server: prints what it saw (JSON)."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import gevent  # noqa: E402

from flask_sse_run import disconnected, shutdown  # noqa: E402
from flask_sse_run.cancellation import CancelToken  # noqa: E402
from flask_sse_run.gevent_stream import GeventStream  # noqa: E402
from flask_sse_run.streaming import StreamOptions  # noqa: E402

results: dict[str, object] = {}
options = StreamOptions(request_id="r", logger=logging.getLogger("units"), keepalive=0.2)


def endless(log: list[str]) -> Iterator[str]:
    try:
        while True:
            yield "tick"
            gevent.sleep(0.05)
    finally:
        log.append(f"finally, disconnected() {disconnected()}")


def body(log: list[str], written: list[bytes]) -> GeventStream:
    stream = GeventStream(endless(log), options, token=CancelToken(), sock=None)
    stream.attach_writer(written.append)  # what the server's WSGI write() would send
    return stream


# close() before the body was ever iterated still closes the user's generator.
log: list[str] = []
never = endless(log)
next(never)  # started, so that close() runs its finally
GeventStream(never, options, token=CancelToken(), sock=None).close()
results["close_before_iteration"] = log

# close() mid-stream (what gunicorn does when a write fails) runs the finally at once.
log, written = [], []
stream = body(log, written)
chunks = iter(stream)
first = next(chunks)
stream.close()
results["close_mid_stream"] = {"first": first.decode(), "log": log}


# An item that cannot be encoded ends the stream with an error event; the client is still
# there, so the generator's finally does not see disconnected().
def unencodable(log: list[str]) -> Iterator[object]:
    try:
        yield object()
    finally:
        log.append(f"finally, disconnected() {disconnected()}")


log = []
failing = GeventStream(unencodable(log), options, token=CancelToken(), sock=None)
results["unencodable"] = {"body": b"".join(failing).decode(), "log": log}

# Keep-alive while the generator blocks is written by a helper through write().
log, written = [], []


def slow(log: list[str]) -> Iterator[str]:
    yield "a"
    yield "b"
    gevent.sleep(0.5)
    yield "c"


stream = GeventStream(slow(log), options, token=CancelToken(), sock=None)
stream.attach_writer(written.append)
out = b"".join(stream)
results["keepalive"] = {"body": out.decode(), "written": [w.decode() for w in written]}

# A stream that starts after the worker began shutting down ends with the shutdown event.
shutdown.begin_shutdown()
log, written = [], []
late = body(log, written)
results["after_shutdown"] = {"body": b"".join(late).decode(), "log": log}
print(json.dumps(results))
