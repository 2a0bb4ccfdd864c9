"""Resumable runs through Flask's test client: the producer in a thread, no gevent (the live
behaviour under gunicorn is in test_runs_live.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g, request

from flask_sse_run import Event, SSERun, disconnected
from flask_sse_run.testing import parse_events
from tests.redis_server import RedisServer


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


def test_a_workers_runs_share_one_byte_budget_ended_ones_go_oldest_first_then_new_runs_get_503() -> None:
    # Each run may hold 1000 bytes, all of them 2000: a new run needs 1000 held at most. An
    # event of n characters is stored as 47 + n bytes (its id and data lines).
    app = Flask(__name__)
    app.config.update(SSE_RUN_RESUME_MAX_BYTES=1000, SSE_RUN_MAX_BYTES=2000)
    sse = SSERun(app)
    gate = threading.Event()

    @sse.function(resumable=True)
    def blob(size: int, wait: bool = False) -> Iterator[str]:
        yield "x" * size
        if wait:
            gate.wait(10)

    client = app.test_client()
    store = app.extensions["sse_run"].runs.store

    def start(size: int, wait: bool = False) -> Any:
        return client.post("/blob", json={"size": size, "wait": wait}, headers={"Prefer": "respond-async"})

    def held(run_id: str, status: str = "running") -> bool:
        info = store.get(run_id)
        return info is not None and info.last_seq == 1 and info.status == status

    ended = []
    for _ in range(2):
        ended.append(start(300).json["run_id"])
        wait_for(lambda: held(ended[-1], "complete"))
    running = []
    for _ in range(2):  # the second finds no room until the oldest ended run is forgotten
        running.append(start(550, wait=True).json["run_id"])
        wait_for(lambda: held(running[-1]))
    assert client.get(f"/runs/{ended[0]}").status_code == 404
    kept = client.get(f"/runs/{ended[1]}")
    assert kept.status_code == 200 and parse_events(kept.data)[0].data == "x" * 300
    # The running runs fill it: the other ended run goes, and that is not room enough.
    refused = start(10)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "30"
    assert refused.json == {
        "error": "this server holds 2000 bytes of runs' events already; try again shortly"
    }
    assert client.get(f"/runs/{ended[1]}").status_code == 404
    # A run that ends makes room.
    gate.set()
    for run_id in running:
        wait_for(lambda run_id=run_id: held(run_id, "complete"))
    assert start(10).status_code == 202


def test_the_janitor_gives_the_memory_of_forgotten_runs_back_at_most_every_trim_every(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flask_sse_run.runs import runtime

    assert runtime.trim_heap() is True  # glibc's malloc_trim, here
    trims: list[float] = []
    app, _ = runs_app(SSE_RUN_RESUME_TTL=0)
    client = app.test_client()
    runs = app.extensions["sse_run"].runs

    def trim() -> bool:
        # This app's only: the janitors of other tests' apps, still looking after their runs,
        # call the module's trim_heap too.
        if sys._getframe(1).f_locals.get("self") is runs:
            trims.append(time.monotonic())
        return True

    monkeypatch.setattr(runtime, "trim_heap", trim)
    monkeypatch.setattr(runtime, "TRIM_AFTER", 100)  # bytes: three events of a run are more
    for expected in (1, 1):  # the second run's are given back TRIM_EVERY after the first's
        client.post("/ticks", json={"n": 3})
        wait_for(lambda: not runs.producers)
        time.sleep(0.01)  # past the TTL of 0
        runs.check()
        assert len(trims) == expected and len(runs.store) == 0
    monkeypatch.setattr(runtime, "TRIM_EVERY", 0.0)
    runs.check()
    assert len(trims) == 2


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(params=["memory", "redis"])
def store_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    return {"SSE_RUN_REDIS_URL": request.getfixturevalue("redis_url"), "SSE_RUN_REDIS_PREFIX": "beyond:"}


def test_a_position_beyond_a_running_runs_last_event_is_400_at_once(store_config: dict[str, Any]) -> None:
    app, seen = runs_app(**store_config)
    client = app.test_client()
    start = client.post("/ticks", json={"n": 3, "wait": True}, headers={"Prefer": "respond-async"})
    run_id, location = start.json["run_id"], start.headers["Location"]
    store = app.extensions["sse_run"].runs.store
    wait_for(lambda: store.get(run_id).last_seq == 1)  # event 1 made; the run waits at the gate
    try:
        beyond = [
            client.post("/ticks", json={}, headers={"Last-Event-ID": f"{run_id}:2"}),
            client.get(location, headers={"Last-Event-ID": f"{run_id}:9"}),
            client.get(f"{location}?last_event_id=2"),
        ]
        expected = {
            "error": "Last-Event-ID (or last_event_id) is beyond this run's last event so far (seq 1); "
            "resume from an id the run sent"
        }
        for response in beyond:
            assert (response.status_code, response.json) == (400, expected)
            assert response.headers["X-Run-ID"] == run_id
    finally:
        seen["gate"].set()
    # At its last event is no error: the rest follows.
    followed = client.get(f"{location}?last_event_id=1")
    assert [e.id for e in parse_events(followed.data)] == [f"{run_id}:2", f"{run_id}:3"]
    wait_for(lambda: store.get(run_id).status == "complete")
    # Ended, nothing more will come at or after its end: 204, stop reconnecting.
    assert client.get(location, headers={"Last-Event-ID": f"{run_id}:3"}).status_code == 204
    assert client.get(f"{location}?last_event_id=9").status_code == 204


def test_a_reconnect_beyond_the_last_event_while_the_store_was_away_ends_with_an_error(
    tmp_path: Path,
) -> None:
    # The store does not answer (past its 2 s call timeout) when the reconnect comes: the
    # response is a 200 stream that waits for it, too late for a 400; it ends with the reason
    # instead of waiting for a position the run never gave.
    with RedisServer(tmp_path) as redis_server:
        app, seen = runs_app(SSE_RUN_REDIS_URL=redis_server.url)
        client = app.test_client()
        start = client.post("/ticks", json={"n": 3, "wait": True}, headers={"Prefer": "respond-async"})
        run_id = start.json["run_id"]
        store = app.extensions["sse_run"].runs.store
        wait_for(lambda: store.get(run_id).last_seq == 1)
        assert redis_server.process is not None
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        resume = threading.Timer(3.5, os.kill, (redis_server.process.pid, signal.SIGCONT))
        resume.start()
        try:
            response = client.post("/ticks", json={}, headers={"Last-Event-ID": f"{run_id}:2"})
            assert response.status_code == 200
            events = parse_events(response.data)
        finally:
            resume.join()
            seen["gate"].set()
        assert [e.event for e in events] == ["error"]
        assert json.loads(events[0].data)["type"] == "BadPosition"


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
