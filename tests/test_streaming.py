"""The streaming module's pieces on their own; whole streams are tested in test_views.py
(Flask's test client) and test_runtime_live.py (real gunicorn)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import pytest

from flask_sse_run.cancellation import CancelToken, current_token, disconnected
from flask_sse_run.streaming import StreamOptions, TrustedHeaders, close_stream_source

OPTIONS = StreamOptions(request_id="r1", logger=logging.getLogger("tests.streaming"))


def test_trusted_headers_read_like_any_headers() -> None:
    headers = TrustedHeaders([("Content-Type", "text/event-stream"), ("X-Request-ID", "r1")])
    assert headers["content-type"] == "text/event-stream"
    assert headers.to_wsgi_list() == [("Content-Type", "text/event-stream"), ("X-Request-ID", "r1")]
    headers["Vary"] = "Accept-Encoding"  # later writes go through Werkzeug as usual
    assert headers.get("vary") == "Accept-Encoding"


def test_copies_of_trusted_headers_do_not_write_into_the_original() -> None:
    headers = TrustedHeaders([("A", "1")])
    copied, shallow, merged = headers.copy(), copy.copy(headers), headers | {"D": "4"}
    copied["B"] = "2"
    shallow["C"] = "3"
    assert list(headers.items()) == [("A", "1")]
    assert list(merged.items()) == [("A", "1"), ("D", "4")]


@pytest.mark.parametrize("early", [True, False])
def test_closing_a_stream_source_binds_the_token_and_cancels_it(early: bool) -> None:
    seen: list[tuple[bool, object]] = []
    token = CancelToken()

    def gen() -> Iterator[int]:
        try:
            yield 1
        finally:
            seen.append((disconnected(), current_token()))

    source = gen()
    next(source)
    close_stream_source(source, token, "closed", early=early, options=OPTIONS)
    # Early (the client left): cancelled before the finally runs, so it knows. Otherwise the
    # client is still there while the generator cleans up.
    assert seen == [(early, token)]
    assert token.cancelled and token.reason == "closed"
    assert current_token() is None  # unbound again afterwards


def _raises_in_finally() -> Iterator[int]:
    try:
        yield 1
    finally:
        raise RuntimeError("cleanup failed")


def _ignores_generator_exit() -> Iterator[int]:
    try:
        yield 1
    except BaseException:  # the user's mistake this guards against: it yields again
        yield 2


@pytest.mark.parametrize("make", [_raises_in_finally, _ignores_generator_exit])
def test_a_generator_that_fails_to_close_is_logged_once_and_does_not_raise(
    make: object, caplog: pytest.LogCaptureFixture
) -> None:
    source = make()  # type: ignore[operator]
    next(source)
    token = CancelToken()
    with caplog.at_level(logging.ERROR, logger="tests.streaming"):
        close_stream_source(source, token, "shutdown", early=True, options=OPTIONS)
    assert token.cancelled
    assert [r.getMessage() for r in caplog.records] == ["stream r1: closing the generator failed"]
