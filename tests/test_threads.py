from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_sse_run import CancelToken, disconnected, iterate_in_thread, run_in_thread, thread_executor
from flask_sse_run.cancellation import bind_token
from flask_sse_run.threads import ThreadChannel

ROOT = Path(__file__).resolve().parent.parent


def test_items_arrive_in_order_from_another_thread() -> None:
    threads = set()

    def source() -> Iterator[int]:
        for i in range(100):
            threads.add(threading.get_ident())
            yield i

    assert list(iterate_in_thread(source(), maxsize=3)) == list(range(100))
    assert threads and threading.get_ident() not in threads


def test_each_item_arrives_as_it_is_produced() -> None:
    def slow() -> Iterator[float]:
        for _ in range(3):
            time.sleep(0.5)
            yield time.monotonic()

    # Each as it is made, not with the next one (0.5 s later) or at the end.
    for produced in iterate_in_thread(slow()):
        assert time.monotonic() - produced < 0.3


def test_an_exception_in_the_thread_is_raised_in_the_stream_after_earlier_items() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise KeyError("in the thread")

    iterator = iterate_in_thread(failing())
    assert next(iterator) == 1
    with pytest.raises(KeyError, match="in the thread"):
        next(iterator)


def test_closing_the_stream_stops_the_thread_and_runs_its_finally() -> None:
    state: list[str] = []

    def endless() -> Iterator[int]:
        try:
            while True:
                yield 1
        finally:
            state.append("finally")

    iterator = iterate_in_thread(endless(), maxsize=2)
    assert next(iterator) == 1
    iterator.close()  # returns only once the thread has ended
    assert state == ["finally"]


def test_run_in_thread_sees_the_streams_cancel_token() -> None:
    token = CancelToken()
    seen: list[bool] = []

    def work(channel: ThreadChannel[str]) -> None:
        seen.append(disconnected())
        channel.send("started")
        while not channel.closed:
            time.sleep(0.01)
        seen.append(disconnected())

    with bind_token(token):
        iterator = run_in_thread(work)
        assert next(iterator) == "started"
        token.cancel("client gone")
        assert list(iterator) == []
    assert seen == [False, True]


def test_send_after_close_raises_stream_closed_and_ends_the_work_quietly() -> None:
    sent: list[int] = []

    def work(channel: ThreadChannel[int]) -> None:
        for i in range(1000):
            channel.send(i)
            sent.append(i)

    iterator = run_in_thread(work, maxsize=1)
    next(iterator)
    iterator.close()
    assert len(sent) < 10


def test_a_dedicated_executor_runs_all_work_on_one_thread() -> None:
    executor = thread_executor(1)
    idents = set()

    def source() -> Iterator[int]:
        idents.add(threading.get_ident())
        yield 1

    for _ in range(3):
        assert list(iterate_in_thread(source(), executor=executor)) == [1]
    assert len(idents) == 1
    executor.shutdown()


def test_maxsize_must_be_positive() -> None:
    with pytest.raises(ValueError):
        run_in_thread(lambda channel: None, maxsize=0)


def test_under_gevent_the_hub_stays_responsive_while_the_thread_blocks() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/threads_under_gevent.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    full = data["full"]
    assert [item for item, _ in full["arrivals"]] == [0, 1, 2, 3, 4]
    # One item every 0.2 s, not a burst at the end.
    times = [t for _, t in full["arrivals"]]
    assert all(later - earlier > 0.15 for earlier, later in itertools.pairwise(times))
    assert full["max_tick_gap"] < 0.3  # other greenlets ran throughout (a frozen hub: 0.6 s)
    assert full["log"][-1] == "finally"
    thread_ids = {entry.split(":")[1] for entry in full["log"][:-1]}
    assert thread_ids and str(full["hub_thread"]) not in thread_ids
    # Closed after the first item: the thread finishes the item it was making, then stops.
    closed = data["closed"]
    assert closed["first"] == 0 and closed["log"][-1] == "finally" and len(closed["log"]) <= 3
    # The async watcher is closed once, only after the thread ended (never under its send()).
    assert closed["at_watcher_close"] == [{"source_finally_ran": True, "thread_finished": True}]
    # The trap this avoids: a monkey-patched Thread froze the hub for the whole 0.6 s.
    assert data["patched_thread_max_gap"] > 0.5


def test_work_queued_behind_busy_threads_is_skipped_if_its_stream_ended() -> None:
    executor = thread_executor(1)
    release = threading.Event()
    ran: list[str] = []

    def blocker(channel: ThreadChannel[str]) -> None:
        channel.send("busy")
        release.wait(5)

    def queued(channel: ThreadChannel[str]) -> None:
        ran.append("queued work ran")

    first = run_in_thread(blocker, executor=executor)
    assert next(first) == "busy"
    token = CancelToken()
    with bind_token(token):
        second = run_in_thread(queued, executor=executor)
        # The stream ends (its client left) while its work waits for the only thread.
        threading.Timer(0.1, token.cancel).start()
        threading.Timer(0.3, release.set).start()
        assert list(second) == []
    first.close()
    executor.shutdown(wait=True)
    assert ran == []
