"""The in-process run store on its own (threads; the runtime drives it from greenlets too)."""

from __future__ import annotations

import threading
import time

import pytest

from flask_sse_run.runs.memory import MemoryRunStore
from flask_sse_run.runs.store import StoreFull

RUN = "a" * 32


def store(**bounds: float) -> MemoryRunStore:
    settings = {"max_events": 100, "max_bytes": 1 << 20, "max_runs": 10, "ttl": 60.0, **bounds}
    made = MemoryRunStore(**settings)  # type: ignore[arg-type]
    made.create(RUN, "run", "", None)
    return made


def events(first: int, last: int, size: int = 10) -> list[tuple[int, bytes]]:
    return [(seq, b"x" * size) for seq in range(first, last + 1)]


def test_reads_what_was_appended_after_a_position() -> None:
    runs = store()
    runs.append(RUN, events(1, 5))
    found = runs.read(RUN, 2, limit=100)
    assert found is not None and [seq for seq, _ in found.events] == [3, 4, 5]
    assert found.missed == 0 and found.last_seq == 5 and not found.ended
    limited = runs.read(RUN, 0, limit=2)
    assert limited is not None and [seq for seq, _ in limited.events] == [1, 2]
    nothing = runs.read(RUN, 5, limit=100)
    assert nothing is not None and list(nothing.events) == []


def test_the_oldest_events_go_beyond_the_bounds_and_a_reader_learns_how_many_it_missed() -> None:
    runs = store(max_events=3)
    runs.append(RUN, events(1, 10))
    found = runs.read(RUN, 2, limit=100)
    assert found is not None and [seq for seq, _ in found.events] == [8, 9, 10] and found.missed == 5
    by_bytes = store(max_bytes=25)
    by_bytes.append(RUN, events(1, 4))
    found = by_bytes.read(RUN, 0, limit=100)
    assert found is not None and [seq for seq, _ in found.events] == [3, 4] and found.missed == 2


def test_the_newest_event_is_kept_even_when_larger_than_the_byte_bound() -> None:
    runs = store(max_bytes=5)
    runs.append(RUN, events(1, 2, size=50))
    found = runs.read(RUN, 0, limit=100)
    assert found is not None and [seq for seq, _ in found.events] == [2]


@pytest.mark.parametrize("change", ["append", "finish"])
def test_a_waiter_wakes_when_events_come_or_the_run_ends(change: str) -> None:
    runs = store()
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: (runs.wait(RUN, 0, timeout=30), woke.set()))
    waiter.start()
    time.sleep(0.1)
    assert not woke.is_set()  # nothing after seq 0 yet: it waits
    if change == "append":
        runs.append(RUN, events(1, 1))
    else:
        runs.finish(RUN, "complete")
    assert woke.wait(10)  # woken by the change, long before its 30 s timeout
    waiter.join(5)


def test_a_wait_returns_at_once_when_there_is_already_more() -> None:
    runs = store()
    runs.append(RUN, events(1, 2))
    started = time.monotonic()
    runs.wait(RUN, 1, timeout=30)
    assert time.monotonic() - started < 10


def test_clients_attach_and_the_last_one_leaving_marks_the_run_idle() -> None:
    runs = store()
    info = runs.get(RUN)
    assert info is not None and info.clients == 0 and info.idle_since is not None  # started idle
    runs.attach(RUN)
    runs.attach(RUN)
    info = runs.get(RUN)
    assert info is not None and info.clients == 2 and info.idle_since is None
    runs.detach(RUN)
    info = runs.get(RUN)
    assert info is not None and info.idle_since is None
    runs.detach(RUN)
    info = runs.get(RUN)
    assert info is not None and info.clients == 0 and info.idle_since is not None


def test_an_ended_run_is_forgotten_after_the_ttl_and_a_running_one_never() -> None:
    runs = store(ttl=0.05)
    runs.create("b" * 32, "run", "", None)
    runs.finish(RUN, "complete")
    time.sleep(0.1)
    assert runs.get(RUN) is None and runs.read(RUN, 0, 10) is None
    assert runs.get("b" * 32) is not None
    runs.expire()
    assert len(runs) == 1 and runs.pending()


def test_the_store_refuses_runs_beyond_max_runs_until_ended_ones_expire() -> None:
    runs = store(max_runs=1, ttl=0.05)
    with pytest.raises(StoreFull) as info:
        runs.create("b" * 32, "run", "", None)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"
    runs.finish(RUN, "complete")
    time.sleep(0.1)
    runs.create("b" * 32, "run", "", None)  # the ended one made room


def test_a_cancel_request_is_recorded_for_the_producer() -> None:
    runs = store()
    assert runs.request_cancel(RUN) is True
    info = runs.get(RUN)
    assert info is not None and info.cancel_requested
    assert runs.request_cancel("c" * 32) is False


def test_nothing_is_appended_to_an_ended_run() -> None:
    runs = store()
    runs.finish(RUN, "cancelled")
    runs.append(RUN, events(1, 2))
    found = runs.read(RUN, 0, 10)
    assert found is not None and list(found.events) == [] and found.status == "cancelled" and found.ended
