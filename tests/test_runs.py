"""Resumable runs through Flask's test client: the producer in a thread, no gevent (the live
behaviour under gunicorn is in test_runs_live.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, g, request

from flask_sse_run import Event, SSERun, disconnected
from flask_sse_run.testing import parse_events


def runs_app(**config: Any) -> tuple[Flask, dict[str, Any]]:
    app = Flask(__name__)
    app.config.update(config)
    sse = SSERun(app)
    seen: dict[str, Any] = {"started": 0, "cancelled": [], "gate": threading.Event()}

    @sse.function(resumable=True, methods=("GET", "POST"))
    def ticks(n: int, wait: bool = False) -> Iterator[Any]:
        seen["started"] += 1
        g.caller = request.headers.get("X-Caller", "")  # the request context is there
        try:
            for i in range(n):
                if wait and i == 1:
                    seen["gate"].wait(10)
                yield Event(data=i, event="tick", id="mine") if i == 0 else f"{i} {g.caller}"
        finally:
            seen["cancelled"].append(disconnected())

    @sse.function
    def plain(n: int) -> Iterator[int]:
        yield from range(n)

    return app, seen


def wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_run_streams_its_events_with_ids_replacing_the_generators_own() -> None:
    app, seen = runs_app()
    response = app.test_client().post("/ticks", json={"n": 3}, headers={"X-Caller": "me"})
    run_id = response.headers["X-Run-ID"]
    events = parse_events(response.data)
    assert [(e.event, e.data, e.id) for e in events] == [
        ("tick", "0", f"{run_id}:1"),
        ("message", "1 me", f"{run_id}:2"),
        ("message", "2 me", f"{run_id}:3"),
    ]
    assert seen["started"] == 1


def test_a_non_resumable_function_is_unchanged() -> None:
    app, _ = runs_app()
    response = app.test_client().post("/plain", json={"n": 2})
    assert response.data == b"data: 0\n\ndata: 1\n\n" and "X-Run-ID" not in response.headers


def test_sse_run_resumable_makes_every_function_resumable() -> None:
    app, _ = runs_app(SSE_RUN_RESUMABLE=True)
    response = app.test_client().post("/plain", json={"n": 1})
    assert response.data == f"id: {response.headers['X-Run-ID']}:1\ndata: 0\n\n".encode()


def test_a_reconnect_reads_after_its_position_without_running_the_function_again() -> None:
    app, seen = runs_app()
    client = app.test_client()
    run_id = client.post("/ticks", json={"n": 4}).headers["X-Run-ID"]
    response = client.get("/ticks?n=99", headers={"Last-Event-ID": f"{run_id}:2"})
    assert [e.id for e in parse_events(response.data)] == [f"{run_id}:3", f"{run_id}:4"]
    assert seen["started"] == 1
    assert client.post("/ticks", json={}, headers={"Last-Event-ID": f"{run_id}:4"}).status_code == 204


def test_json_clients_of_a_resumable_function_get_the_collected_document() -> None:
    app, _ = runs_app()
    response = app.test_client().post("/ticks", json={"n": 2}, headers={"Accept": "application/json"})
    assert response.get_json()["result"] == [0, "1 "] and "X-Run-ID" not in response.headers


def test_a_detached_run_is_cancelled_when_its_window_passes_with_no_client() -> None:
    app, seen = runs_app(SSE_RUN_RESUME_WINDOW=0)
    client = app.test_client()
    response = client.post("/ticks", json={"n": 3, "wait": True}, headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    wait_for(lambda: seen["started"] == 1)
    runs = app.extensions["sse_run"].runs
    runs.check()  # the janitor's round: no client, window 0
    seen["gate"].set()  # the thread sees the cancel at its next yield
    wait_for(lambda: seen["cancelled"] == [True])
    info = runs.store.get(response.json["run_id"])
    assert info is not None and info.status == "cancelled"


def test_delete_cancels_and_then_the_run_reads_to_its_end() -> None:
    app, seen = runs_app()
    client = app.test_client()
    start = client.post("/ticks", json={"n": 3, "wait": True}, headers={"Prefer": "respond-async"})
    location = start.headers["Location"]
    assert client.delete(location).status_code == 204
    seen["gate"].set()
    wait_for(lambda: seen["cancelled"] == [True])
    events = parse_events(client.get(location).data)
    # What it made before the cancel, then why it stopped: never taken for a finished run.
    assert [e.data for e in events[:-1]] == ["0"]
    assert events[-1].event == "error" and json.loads(events[-1].data)["type"] == "RunCancelled"
    assert events[-1].id == events[0].id.replace(":1", ":2")
    assert client.get(location, headers={"Last-Event-ID": events[-1].id}).status_code == 204
    assert client.delete("/runs/" + "0" * 32).status_code == 404


@pytest.mark.parametrize(
    ("method", "status", "allow"),
    [("PUT", 405, "DELETE, GET, OPTIONS"), ("OPTIONS", 204, "DELETE, GET, OPTIONS")],
)
def test_runs_url_answers_get_and_delete(method: str, status: int, allow: str) -> None:
    app, _ = runs_app()
    response = app.test_client().open("/runs/" + "0" * 32, method=method)
    assert response.status_code == status and response.headers["Allow"] == allow


def test_a_bad_position_on_the_runs_url_is_400() -> None:
    app, _ = runs_app()
    client = app.test_client()
    run_id = client.post("/ticks", json={"n": 1}).headers["X-Run-ID"]
    response = client.get(f"/runs/{run_id}?last_event_id=x")
    assert response.status_code == 400
    assert response.json == {"error": "last_event_id must be a seq number or an event id of this run"}


def test_a_run_of_one_instance_is_not_found_under_another_prefix() -> None:
    app = Flask(__name__)
    first, second = SSERun(app), SSERun(app, url_prefix="/other")

    @first.function(resumable=True)
    def ticks(n: int) -> Iterator[int]:
        yield from range(n)

    @second.function(resumable=True, name="ticks")
    def other_ticks(n: int) -> Iterator[int]:
        yield from range(n)

    client = app.test_client()
    run_id = client.post("/ticks", json={"n": 1}).headers["X-Run-ID"]
    assert client.get(f"/other/runs/{run_id}").status_code == 404
    assert client.post("/other/ticks", headers={"Last-Event-ID": f"{run_id}:0"}).status_code == 204
    assert client.get(f"/runs/{run_id}").status_code == 200


@pytest.mark.parametrize("methods", [(), ("PUT",), ("GET", "DELETE")])
def test_only_get_and_post_can_serve_a_function(methods: tuple[str, ...]) -> None:
    from flask_sse_run import RegistrationError

    with pytest.raises(RegistrationError, match="methods must be GET, POST or both"):
        SSERun().function(methods=methods)
