from __future__ import annotations

import threading
import time

import pytest

from flask_sse_run import RequestError
from flask_sse_run.llm import DeviceQueue


def test_beyond_concurrency_and_queue_requests_get_503_with_retry_after() -> None:
    queue = DeviceQueue(concurrency=1, max_queue=1, retry_after=7)
    first, second = queue.admit(), queue.admit()
    with pytest.raises(RequestError) as refused:
        queue.admit()
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "7"}
    first.release()
    queue.admit().release()  # a place came free
    second.release()
    assert (queue.running, queue.waiting) == (0, 0)


def test_waiting_requests_run_one_at_a_time_in_arrival_order() -> None:
    queue = DeviceQueue(concurrency=1, max_queue=4)
    order: list[str] = []
    active = []

    def job(name: str, ticket: object) -> None:
        ticket.wait()  # type: ignore[attr-defined]
        active.append(name)
        assert len(active) == 1
        order.append(name)
        time.sleep(0.02)
        active.remove(name)
        ticket.release()  # type: ignore[attr-defined]

    tickets = [(name, queue.admit()) for name in "abc"]
    assert queue.waiting == 3
    threads = []
    for name, ticket in tickets:
        threads.append(threading.Thread(target=job, args=(name, ticket)))
        threads[-1].start()
        time.sleep(0.005)
    for thread in threads:
        thread.join()
    assert order == ["a", "b", "c"] and (queue.running, queue.waiting) == (0, 0)


def test_release_is_idempotent_and_frees_a_running_slot() -> None:
    queue = DeviceQueue(concurrency=1, max_queue=0)
    ticket = queue.admit()
    ticket.wait()
    assert queue.running == 1
    ticket.release()
    ticket.release()
    assert queue.running == 0
    queue.admit().wait()  # the slot is free again


def test_bad_limits_raise() -> None:
    with pytest.raises(ValueError):
        DeviceQueue(concurrency=0)
