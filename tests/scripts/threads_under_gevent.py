"""Run iterate_in_thread under gevent's monkey-patching and print what was measured (JSON)."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from flask_sse_run import threads  # noqa: E402
from flask_sse_run.threads import iterate_in_thread  # noqa: E402

blocking_sleep = monkey.get_original("time", "sleep")
get_ident = monkey.get_original("_thread", "get_ident")
gaps: list[float] = []


def ticker() -> None:
    last = time.perf_counter()
    while True:
        gevent.sleep(0.005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


def produce(log: list[str]) -> object:
    try:
        for i in range(5):
            blocking_sleep(0.2)  # holds its OS thread, as model.generate() would
            log.append(f"{i}:{get_ident()}")
            yield i
    finally:
        log.append("finally")


tick = gevent.spawn(ticker)
gevent.sleep(0.01)
log: list[str] = []
started = time.perf_counter()
arrivals = [(item, time.perf_counter() - started) for item in iterate_in_thread(produce(log))]
full_run = {"arrivals": arrivals, "max_tick_gap": max(gaps), "log": log, "hub_thread": get_ident()}

log2: list[str] = []
# What the thread had done when the hub's watcher was closed: it must have ended by then.
at_watcher_close: list[object] = []
original_close = threads._GeventWaiter.close


def recording_close(self: threads._GeventWaiter, channel: threads.ThreadChannel[object]) -> None:
    original_close(self, channel)
    at_watcher_close.append({"source_finally_ran": "finally" in log2, "thread_finished": channel.finished})


threads._GeventWaiter.close = recording_close  # type: ignore[method-assign]
iterator = iterate_in_thread(produce(log2))
first = next(iterator)
iterator.close()
threads._GeventWaiter.close = original_close  # type: ignore[method-assign]
closed_run = {"first": first, "log": log2, "at_watcher_close": at_watcher_close}

# A monkey-patched threading.Thread for comparison: it is a greenlet and freezes the hub.
gaps.clear()
thread = threading.Thread(target=lambda: [blocking_sleep(0.2) for _ in range(3)])
thread.start()
thread.join()
gevent.sleep(0.02)  # let the ticker record the gap the frozen hub caused
patched_max_gap = max(gaps) if gaps else 0.0
tick.kill()
print(json.dumps({"full": full_run, "closed": closed_run, "patched_thread_max_gap": patched_max_gap}))
