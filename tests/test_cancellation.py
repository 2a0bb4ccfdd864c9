from __future__ import annotations

import logging
import threading

import pytest

from flask_sse_run import CancelToken, current_token, disconnected
from flask_sse_run.cancellation import bind_token


def test_a_token_starts_active_and_cancels_once() -> None:
    token = CancelToken()
    calls: list[str] = []
    token.on_cancel(lambda: calls.append("first"))
    assert not token.cancelled and token.reason is None
    token.cancel("client gone")
    token.cancel("again")
    assert token.cancelled and token.reason == "client gone"
    assert calls == ["first"]


def test_on_cancel_after_cancel_runs_at_once() -> None:
    token = CancelToken()
    token.cancel()
    calls: list[int] = []
    token.on_cancel(lambda: calls.append(1))
    assert calls == [1]


def test_a_failing_callback_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    token = CancelToken()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("callback bug")

    token.on_cancel(broken)
    token.on_cancel(lambda: calls.append("second"))
    with caplog.at_level(logging.ERROR):
        token.cancel()
    assert calls == ["second"]
    assert any("cancel callback failed" in r.getMessage() for r in caplog.records)


def test_callbacks_registered_from_many_threads_all_run() -> None:
    token = CancelToken()
    calls: list[int] = []
    threads = [
        threading.Thread(target=token.on_cancel, args=(lambda i=i: calls.append(i),)) for i in range(50)
    ]
    for thread in threads:
        thread.start()
    token.cancel()
    for thread in threads:
        thread.join()
    assert sorted(calls) == list(range(50))


def test_disconnected_reads_the_bound_token() -> None:
    assert current_token() is None and disconnected() is False
    token = CancelToken()
    with bind_token(token):
        assert current_token() is token and disconnected() is False
        token.cancel()
        assert disconnected() is True
    assert current_token() is None
