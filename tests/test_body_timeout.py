"""The body-read deadline: one hub timer ends the reads that run past their deadline."""

from __future__ import annotations

import time
from types import SimpleNamespace

import gevent
import pytest

from flask_sse_run.body_timeout import SWEEP_INTERVAL, with_deadline
from flask_sse_run.deadlines import deadlines
from flask_sse_run.errors import RequestError

# What body_timeout sees of gevent.monkey in a worker. Only its own name is replaced: patching
# gevent.monkey.is_module_patched itself would reach every thread still running in this process
# (concurrency.gevent_patched remembers a True for good, and later tests would run as if under
# gevent).
SOCKETS_PATCHED = SimpleNamespace(is_module_patched=lambda name: True)


class Stalled:
    """A body that never comes (or comes after ``seconds``)."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds

    def read(self, size: int = -1, /) -> bytes:
        gevent.sleep(self.seconds)
        return b"{}"


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run unpatched; the deadline applies only where sockets are gevent's.
    monkeypatch.setattr("flask_sse_run.body_timeout.monkey", SOCKETS_PATCHED)


@pytest.mark.usefixtures("patched")
def test_the_deadline_interrupts_a_blocked_read() -> None:
    started = time.monotonic()
    with pytest.raises(RequestError) as info:
        with_deadline(Stalled(), 0.2).read(10)
    assert info.value.status == 408
    assert info.value.message == "the request body did not arrive within 0.2 seconds"
    # At the deadline, give or take a sweep (and a loaded machine): not at the 30 s default.
    assert 0.2 <= time.monotonic() - started < 0.2 + SWEEP_INTERVAL + 1.0


@pytest.mark.usefixtures("patched")
def test_concurrent_reads_each_end_at_their_own_deadline_and_fast_ones_are_left_alone() -> None:
    def read(seconds: float, body: Stalled) -> tuple[int | bytes, float]:
        started = time.monotonic()
        try:
            return with_deadline(body, seconds).read(10), time.monotonic() - started
        except RequestError as exc:
            return exc.status, time.monotonic() - started

    jobs = [
        gevent.spawn(read, 0.2, Stalled()),
        gevent.spawn(read, 0.5, Stalled()),
        gevent.spawn(read, 0.5, Stalled(0.05)),  # arrives in time: its value, no 408 later
        gevent.spawn(read, 5.0, Stalled(0.3)),
    ]
    gevent.joinall(jobs, timeout=5)
    results = [job.value for job in jobs]
    assert [value for value, _ in results] == [408, 408, b"{}", b"{}"]
    assert 0.2 <= results[0][1] < results[1][1]  # each at its own deadline
    assert 0.5 <= results[1][1] < 0.5 + SWEEP_INTERVAL + 1.0
    assert 0.3 <= results[3][1] < 5.0  # its body, not its deadline, ended the read


@pytest.mark.usefixtures("patched")
def test_the_timer_stops_once_no_read_is_waiting() -> None:
    with_deadline(Stalled(0.01), 5).read(10)
    gevent.sleep(SWEEP_INTERVAL * 2.5)
    assert not deadlines().active  # an idle worker is not woken ten times a second


@pytest.mark.usefixtures("patched")
def test_a_read_after_the_deadline_is_refused_without_reading() -> None:
    stream = with_deadline(Stalled(), 0.05)
    time.sleep(0.06)
    started = time.monotonic()
    with pytest.raises(RequestError) as info:
        stream.read(10)
    assert info.value.status == 408 and time.monotonic() - started < 0.05


def test_the_deadline_is_off_at_zero_and_without_gevent_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = object()
    assert with_deadline(stream, 30) is stream  # type: ignore[arg-type]  # tests run unpatched
    monkeypatch.setattr("flask_sse_run.body_timeout.monkey", SOCKETS_PATCHED)
    assert with_deadline(stream, 0) is stream  # type: ignore[arg-type]
