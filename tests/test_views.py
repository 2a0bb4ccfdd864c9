from __future__ import annotations

import gc
import itertools
import json
import logging
import threading
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import gevent
import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_sse_run import RequestError, SSERun, disconnected, views
from flask_sse_run.gevent_stream import FAIR_SLICE
from flask_sse_run.testing import ServerSentEvent, parse_events
from tests.apps import create_app, endless_app


def error_body(response: object) -> dict[str, object]:
    assert response.content_type == "application/json"  # type: ignore[attr-defined]
    return response.get_json()  # type: ignore[attr-defined,no-any-return]


# --- bad input: one test each, status and body -------------------------------------------------


def test_non_json_body_is_400(client: FlaskClient) -> None:
    response = client.post("/run", data="upper_range=3", content_type="application/json")
    assert response.status_code == 400
    assert error_body(response)["error"].startswith("body is not valid JSON")


def test_json_that_is_not_an_object_is_400(client: FlaskClient) -> None:
    response = client.post("/run", json=[3])
    assert response.status_code == 400
    assert error_body(response) == {"error": "body must be a JSON object of the function's parameters"}


def test_missing_parameter_is_422(client: FlaskClient) -> None:
    response = client.post("/run", json={})
    assert response.status_code == 422
    assert error_body(response) == {
        "error": "invalid parameters",
        "detail": [{"loc": ["upper_range"], "msg": "Field required", "type": "missing"}],
    }


def test_unknown_parameter_is_422(client: FlaskClient) -> None:
    response = client.post("/run", json={"upper_range": 1, "lower_range": 0})
    assert response.status_code == 422
    assert error_body(response)["detail"] == [
        {"loc": ["lower_range"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
    ]


def test_mistyped_parameter_is_422_and_not_echoed(client: FlaskClient) -> None:
    response = client.post("/run", json={"upper_range": "three-thousand-and-" + "x" * 5000})
    assert response.status_code == 422
    body = error_body(response)
    assert body["detail"][0]["loc"] == ["upper_range"]  # type: ignore[index]
    assert body["detail"][0]["type"] == "int_parsing"  # type: ignore[index]
    assert b"three-thousand" not in response.data and len(response.data) < 300


def test_a_422_for_huge_keys_stays_small() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def weigh(weights: dict[str, int]) -> int:
        return len(weights)

    client = app.test_client()
    unknown = client.post("/weigh", json={"weights": {}, "u" * 500_000: 1})
    assert unknown.status_code == 422
    assert error_body(unknown)["detail"] == [
        {"loc": ["u" * 32 + "\u2026"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
    ]
    assert len(unknown.data) < 2048
    dict_key = client.post("/weigh", json={"weights": {"k" * 500_000: "heavy"}})
    assert dict_key.status_code == 422
    assert error_body(dict_key)["detail"][0]["loc"] == ["weights", "k" * 32 + "\u2026"]  # type: ignore[index]
    assert len(dict_key.data) < 2048


def test_every_problem_is_listed_in_one_422(client: FlaskClient) -> None:
    response = client.post("/count", json={"n": "x", "delay": "y", "extra": 1})
    assert response.status_code == 422
    assert [d["loc"] for d in error_body(response)["detail"]] == [["n"], ["delay"], ["extra"]]  # type: ignore[union-attr]


def test_wrong_content_type_is_415(client: FlaskClient) -> None:
    response = client.post("/run", data='{"upper_range": 1}', content_type="text/plain")
    assert response.status_code == 415
    assert error_body(response) == {"error": "Content-Type must be application/json"}


def test_body_over_max_body_is_413() -> None:
    client = create_app(SSE_RUN_MAX_BODY=100).test_client()
    response = client.post("/run", json={"upper_range": 1, "pad": "x" * 200})
    assert response.status_code == 413
    assert error_body(response) == {"error": "body is larger than 100 bytes"}


def test_unknown_function_is_404(client: FlaskClient) -> None:
    response = client.post("/walk", json={})
    assert response.status_code == 404
    assert error_body(response) == {"error": "no function named 'walk'"}


def test_unknown_function_name_is_not_echoed_when_odd(client: FlaskClient) -> None:
    response = client.post("/" + "%3Cscript%3E" * 3, json={})
    assert response.status_code == 404
    assert error_body(response) == {"error": "no such function"}


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "TRACE", "PROPFIND"])
def test_any_method_but_post_and_options_is_a_json_405(client: FlaskClient, method: str) -> None:
    response = client.open("/run", method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == "OPTIONS, POST"
    assert error_body(response) == {"error": "this endpoint accepts POST only"}


def test_head_is_405_with_the_same_allow(client: FlaskClient) -> None:
    response = client.head("/run")
    assert response.status_code == 405
    assert response.headers["Allow"] == "OPTIONS, POST"


def test_options_on_a_function_is_204_with_allow(client: FlaskClient) -> None:
    response = client.options("/run", headers={"X-Request-ID": "opt-1"})
    assert response.status_code == 204
    assert response.headers["Allow"] == "OPTIONS, POST"
    assert response.headers["X-Request-ID"] == "opt-1"
    assert response.data == b""
    assert "Content-Type" not in response.headers  # no body, so no type


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "GET"])
def test_any_method_on_an_unknown_function_is_a_json_404(client: FlaskClient, method: str) -> None:
    response = client.open("/walk", method=method)
    assert response.status_code == 404
    assert error_body(response) == {"error": "no function named 'walk'"}


def test_accepting_neither_stream_nor_json_is_406(client: FlaskClient) -> None:
    response = client.post("/run", json={"upper_range": 1}, headers={"Accept": "text/html"})
    assert response.status_code == 406
    assert "text/event-stream" in error_body(response)["error"]  # type: ignore[operator]


def test_errors_carry_the_request_id(client: FlaskClient) -> None:
    response = client.post("/run", json={}, headers={"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"


# --- streaming ---------------------------------------------------------------------------------


def test_stream_headers(client: FlaskClient) -> None:
    response = client.post(
        "/count", json={"n": 1}, headers={"Accept": "text/event-stream", "X-Request-ID": "abc"}
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Request-ID"] == "abc"
    assert "Content-Length" not in response.headers


def test_insane_request_ids_are_replaced(client: FlaskClient) -> None:
    response = client.post("/count", json={"n": 1}, headers={"X-Request-ID": "x" * 500})
    assert len(response.headers["X-Request-ID"]) == 32


@pytest.mark.parametrize("accept", [None, "*/*", "text/event-stream"])
def test_streams_for_event_stream_any_or_no_accept(client: FlaskClient, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    response = client.post("/count", json={"n": 2}, headers=headers)
    assert response.data == b'data: {"i":0}\n\ndata: {"i":1}\n\n'


def test_every_kind_of_item_is_written_exactly(client: FlaskClient) -> None:
    response = client.post("/events")
    assert response.data == (
        b"event: greeting\nid: 1\nretry: 5000\ndata: hello\n\n"
        b": just a comment\n\n"
        b"data: \n\n"
        b"data: two\ndata: lines\n\n"
        b"data: bytes \xc3\xa9\n\n"
        b"data: null\n\n"
        b"data: [1,2.5,true]\n\n"
    )


def test_events_arrive_as_they_are_yielded() -> None:
    app = Flask(__name__)
    sse = SSERun(app)
    released = threading.Event()

    @sse.function
    def gated() -> Iterator[str]:
        yield "first"
        # Only the client can release this: if the body were buffered the test would
        # never see "first" before the wait, and would read "timed out".
        yield "second" if released.wait(5) else "timed out"

    response = app.test_client().post("/gated", buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"data: first\n\n"
    released.set()
    assert next(chunks) == b"data: second\n\n"


def test_the_request_context_is_available_while_streaming(client: FlaskClient) -> None:
    response = client.post("/whoami", headers={"X-Caller": "alice"})
    assert response.data == b"data: alice\n\n"


def test_an_exception_ends_the_stream_with_one_error_event(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = client.post("/fail_after", json={"n": 2}, headers={"X-Request-ID": "rid-7"})
    events = parse_events(response.data)
    assert [e.data for e in events[:2]] == ["item 0", "item 1"]
    assert events[2].event == "error"
    assert json.loads(events[2].data) == {
        "type": "InternalError",
        "message": "the stream failed (request id rid-7)",
    }
    assert len(events) == 3
    assert response.data.endswith(b"\n\n")
    record = next(r for r in caplog.records if "rid-7" in r.getMessage())
    assert record.exc_info is not None and "boom at the end" in str(record.exc_info[1])


def test_expose_errors_shows_type_and_message() -> None:
    client = create_app(SSE_RUN_EXPOSE_ERRORS=True).test_client()
    events = parse_events(client.post("/fail_after", json={"n": 0}).data)
    assert events == [
        ServerSentEvent(data='{"type":"ValueError","message":"boom at the end"}', event="error")
    ]


def test_an_unencodable_item_becomes_an_error_event() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def nan() -> Iterator[float]:
        yield 1.0
        yield float("nan")

    events = parse_events(app.test_client().post("/nan").data)
    assert [e.event for e in events] == ["message", "error"]


def test_the_worker_serves_the_next_request_after_a_failed_stream(client: FlaskClient) -> None:
    client.post("/fail_after", json={"n": 1})
    assert client.post("/count", json={"n": 1}).data == b'data: {"i":0}\n\n'


def test_end_event_is_off_by_default(client: FlaskClient) -> None:
    assert client.post("/count", json={"n": 1}).data == b'data: {"i":0}\n\n'


def test_end_event_marks_a_finished_stream() -> None:
    client = create_app(SSE_RUN_END_EVENT="done").test_client()
    assert client.post("/count", json={"n": 1}).data == b'data: {"i":0}\n\nevent: done\ndata: \n\n'
    failed = parse_events(client.post("/fail_after", json={"n": 0}).data)
    assert [e.event for e in failed] == ["error"]  # a failed stream is not "done"


def test_closing_the_response_closes_the_generator() -> None:
    app, closed, disconnected_in_finally = endless_app()
    response = app.test_client().post("/endless", buffered=False)
    assert next(iter(response.response)) == b"data: 1\n\n"
    response.close()  # what the server does when a write fails: the client is gone
    assert closed.is_set()
    assert disconnected_in_finally == [True]  # and the generator is told


def test_a_generator_whose_item_cannot_be_encoded_is_not_told_its_client_left() -> None:
    app = Flask(__name__)
    sse = SSERun(app)
    seen: list[bool] = []

    @sse.function
    def unencodable() -> Iterator[object]:
        try:
            yield object()
        finally:
            seen.append(disconnected())

    response = app.test_client().post("/unencodable")
    assert b"event: error" in response.data  # the client is still there, and told
    assert seen == [False]


# --- JSON for clients that ask for it -----------------------------------------------------------


def test_json_clients_get_the_collected_items(client: FlaskClient) -> None:
    response = client.post(
        "/count", json={"n": 3}, headers={"Accept": "application/json", "X-Request-ID": "j1"}
    )
    assert response.status_code == 200
    body = response.get_json()
    assert body["run_id"] == "j1"
    assert body["result"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert isinstance(body["run_time_ms"], float) and body["run_time_ms"] >= 0


@pytest.mark.parametrize("accept", ["application/json, text/plain, */*", "*/*, application/json"])
def test_clients_that_take_streams_as_much_as_json_get_a_stream(client: FlaskClient, accept: str) -> None:
    # axios's default Accept: a stream (with its pings), not a JSON document after the whole run.
    response = client.post("/count", json={"n": 2}, headers={"Accept": accept})
    assert response.status_code == 200
    assert response.content_type == "text/event-stream; charset=utf-8"
    assert response.data == b'data: {"i":0}\n\ndata: {"i":1}\n\n'


def counting_app() -> tuple[Flask, list[int], threading.Event]:
    """An app whose ``numbers`` generator records what it yielded and whether it was closed."""
    app = Flask(__name__)
    sse = SSERun(app)
    yielded: list[int] = []
    closed = threading.Event()

    @sse.function
    def numbers(n: int) -> Iterator[int]:
        try:
            for i in range(n):
                yielded.append(i)
                yield i
        finally:
            closed.set()

    return app, yielded, closed


def test_a_json_result_of_more_than_max_json_items_is_406_and_closes_the_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(views, "MAX_JSON_ITEMS", 3)
    app, yielded, closed = counting_app()
    response = app.test_client().post("/numbers", json={"n": 1000}, headers={"Accept": "application/json"})
    assert response.status_code == 406
    assert error_body(response) == {
        "error": "the result has more than 3 items; accept text/event-stream to stream it"
    }
    assert yielded == [0, 1, 2, 3]  # one past the cap, then no more
    assert closed.is_set()


def test_a_json_result_of_exactly_max_json_items_is_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "MAX_JSON_ITEMS", 3)
    app, _, closed = counting_app()
    response = app.test_client().post("/numbers", json={"n": 3}, headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.get_json()["result"] == [0, 1, 2]
    assert closed.is_set()


def test_the_default_json_cap_is_100000_items_and_documented() -> None:
    assert views.MAX_JSON_ITEMS == 100_000
    doc = create_app().test_client().get("/openapi.json").get_json()
    assert "more than 100000 items" in doc["paths"]["/count"]["post"]["responses"]["406"]["description"]


def test_collecting_for_json_under_gevent_gives_the_hub_a_turn_every_fair_slice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fake clock that only the generator moves: 1 ms of "work" per item, so the turns are
    # exact however loaded the machine is.
    now = [0.0]
    turns: list[float] = []
    monkeypatch.setattr(views, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(views, "gevent_patched", lambda: True)
    monkeypatch.setattr(gevent, "sleep", lambda seconds=0: turns.append(now[0]))
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def busy(n: int) -> Iterator[int]:
        for i in range(n):  # never blocks
            now[0] = (i + 1) / 1000
            yield i

    response = app.test_client().post("/busy", json={"n": 50}, headers={"Accept": "application/json"})
    assert response.get_json()["result"] == list(range(50))
    assert len(turns) >= 50 * 0.001 / FAIR_SLICE - 1  # a turn every slice, not one at the end
    assert all(b - a <= FAIR_SLICE + 0.001 + 1e-9 for a, b in itertools.pairwise([0.0, *turns]))


def test_collecting_for_json_without_gevent_never_calls_gevent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gevent, "sleep", lambda seconds=0: pytest.fail("gevent.sleep called"))
    app, _, _ = counting_app()
    response = app.test_client().post("/numbers", json={"n": 5}, headers={"Accept": "application/json"})
    assert response.get_json()["result"] == [0, 1, 2, 3, 4]


def test_a_plain_return_value_is_answered_as_json(client: FlaskClient) -> None:
    response = client.post("/plain", json={"a": 1})
    assert response.status_code == 200
    assert response.get_json()["result"] == {"sum": 3}


def test_a_failing_json_call_is_a_500_json_body(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = client.post("/fail_after", json={"n": 1}, headers={"Accept": "application/json"})
    assert response.status_code == 500
    assert error_body(response) == {"error": "the function failed; see the server log"}


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json"])
def test_a_plain_function_returning_a_coroutine_or_async_generator_is_a_clear_500(
    accept: str, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    async def compute() -> int:
        return 1

    async def produce() -> AsyncIterator[int]:
        yield 1

    @sse.function
    def returns_coroutine() -> Any:  # a plain def: registration cannot tell
        return compute()

    @sse.function
    def returns_async_generator() -> Any:
        return produce()

    client = app.test_client()
    for name, kind in [("returns_coroutine", "coroutine"), ("returns_async_generator", "async_generator")]:
        response = client.post(f"/{name}", json={}, headers={"Accept": accept})
        assert response.status_code == 500
        assert error_body(response) == {"error": "the function failed; see the server log"}
        assert f"function {name} returned {kind}, which a WSGI worker cannot run" in caplog.text
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_a_function_may_refuse_a_request_with_its_own_status_before_streaming() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def busy() -> Iterator[str]:
        raise RequestError(503, "the model is busy", headers={"Retry-After": "3"})

    response = app.test_client().post("/busy")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert error_body(response) == {"error": "the model is busy"}
