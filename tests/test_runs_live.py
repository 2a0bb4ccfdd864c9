"""Resumable runs against real gunicorn (gevent worker): reconnects, the window, cancel, 202."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from flask_sse_run.testing import ServerSentEvent, SSEParser
from tests.live import Server, gunicorn

WINDOW = 2.0
CONFIG = {
    "SSE_RUN_KEEPALIVE": 0.5,
    "SSE_RUN_RESUME_WINDOW": WINDOW,
    "SSE_RUN_RESUME_TTL": 30,
    "SSE_RUN_RESUME_MAX_EVENTS": 8,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with gunicorn(tmp_path=tmp_path_factory.mktemp("runs"), config=CONFIG) as srv:
        yield srv


def stats(server: Server) -> dict[str, Any]:
    return requests.get(f"{server.url}/stats", timeout=5).json()  # type: ignore[no-any-return]


def wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Client:
    """One streaming request, read event by event (the way EventSource reads)."""

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        self.parser = SSEParser()
        self._chunks = response.raw.stream(1024, decode_content=True)
        self._ready: list[ServerSentEvent] = []

    def next(self) -> ServerSentEvent:
        while not self._ready:
            self._ready.extend(self.parser.feed(next(self._chunks)))
        return self._ready.pop(0)

    def take(self, count: int) -> list[ServerSentEvent]:
        return [self.next() for _ in range(count)]

    def rest(self) -> list[ServerSentEvent]:
        events = list(self._ready)
        for chunk in self._chunks:
            events.extend(self.parser.feed(chunk))
        self.response.close()
        return events

    def drop(self) -> None:
        self.response.close()  # the connection goes, as a lost network or a closed lid


def open_stream(
    server: Server, method: str = "POST", path: str = "/resumable_ticks", **kwargs: Any
) -> Client:
    headers = {"Accept": "text/event-stream", **kwargs.pop("headers", {})}
    response = requests.request(
        method, f"{server.url}{path}", stream=True, timeout=20, headers=headers, **kwargs
    )
    assert response.status_code == 200, response.text
    return Client(response)


def data(events: list[ServerSentEvent]) -> list[str]:
    return [event.data for event in events]


def test_a_resumable_stream_carries_event_ids_and_its_run_id(server: Server) -> None:
    client = open_stream(server, json={"n": 3, "interval": 0.01})
    run_id = client.response.headers["X-Run-ID"]
    assert len(run_id) == 32 and int(run_id, 16) >= 0
    events = client.rest()
    assert data(events) == ["0", "1", "2"]
    assert [event.id for event in events] == [f"{run_id}:1", f"{run_id}:2", f"{run_id}:3"]


def test_run_ids_are_the_servers_never_the_clients_request_id(server: Server) -> None:
    client = open_stream(server, json={"n": 1, "interval": 0}, headers={"X-Request-ID": "a" * 32})
    assert client.response.headers["X-Request-ID"] == "a" * 32
    assert client.response.headers["X-Run-ID"] != "a" * 32
    client.rest()


def test_a_client_that_reconnects_with_last_event_id_gets_the_rest_and_the_function_ran_once(
    server: Server,
) -> None:
    before = stats(server)["resumable_started"]
    client = open_stream(server, json={"n": 6, "interval": 0.3})
    first = client.take(2)
    client.drop()
    run_id = client.response.headers["X-Run-ID"]
    time.sleep(0.5)  # events made while no one listened wait in the run's buffer
    again = open_stream(server, headers={"Last-Event-ID": first[-1].id}, json={"n": 99})
    assert again.response.headers["X-Run-ID"] == run_id
    rest = again.rest()
    assert data(first + rest) == ["0", "1", "2", "3", "4", "5"]  # each once, in order
    assert [event.id for event in rest] == [f"{run_id}:{seq}" for seq in range(3, 7)]
    assert stats(server)["resumable_started"] == before + 1


def test_a_reconnect_follows_the_method_the_function_is_served_with(server: Server) -> None:
    client = open_stream(server, "GET", params={"n": 3, "interval": 0.2})
    first = client.take(1)
    client.drop()
    rest = open_stream(server, "GET", headers={"Last-Event-ID": first[0].id}).rest()
    assert data(first + rest) == ["0", "1", "2"]


def test_runs_url_follows_a_run_from_a_query_parameter_position(server: Server) -> None:
    client = open_stream(server, json={"n": 5, "interval": 0.2})
    run_id = client.response.headers["X-Run-ID"]
    client.take(2)  # a position the run has reached: one beyond its last event is a 400
    client.drop()
    follower = open_stream(server, "GET", f"/runs/{run_id}", params={"last_event_id": 2})
    assert data(follower.rest()) == ["2", "3", "4"]
    # Or from the start, without a position.
    assert data(open_stream(server, "GET", f"/runs/{run_id}").rest()) == ["0", "1", "2", "3", "4"]


def test_a_run_that_ended_replays_what_is_left_then_answers_204(server: Server) -> None:
    client = open_stream(server, json={"n": 3, "interval": 0})
    events = client.rest()
    run_id = client.response.headers["X-Run-ID"]
    replay = open_stream(server, headers={"Last-Event-ID": events[0].id})
    assert data(replay.rest()) == ["1", "2"]
    done = requests.post(
        f"{server.url}/resumable_ticks", headers={"Last-Event-ID": f"{run_id}:3"}, json={}, timeout=10
    )
    assert done.status_code == 204 and done.content == b""  # EventSource stops reconnecting
    assert requests.get(f"{server.url}/runs/{run_id}?last_event_id=3", timeout=10).status_code == 204


def test_unknown_runs_are_204_on_the_function_url_and_404_on_runs(server: Server) -> None:
    unknown = "0123456789abcdef" * 2
    response = requests.post(
        f"{server.url}/resumable_ticks", headers={"Last-Event-ID": f"{unknown}:4"}, json={}, timeout=10
    )
    assert response.status_code == 204
    for method in ("GET", "DELETE"):
        response = requests.request(method, f"{server.url}/runs/{unknown}", timeout=10)
        assert response.status_code == 404 and response.json() == {"error": "no such run"}
    assert requests.get(f"{server.url}/runs/not-a-run-id", timeout=10).status_code == 404


def test_a_last_event_id_this_server_did_not_make_is_400(server: Server) -> None:
    response = requests.post(
        f"{server.url}/resumable_ticks", headers={"Last-Event-ID": "42"}, json={"n": 1}, timeout=10
    )
    assert response.status_code == 400
    assert response.json() == {"error": "Last-Event-ID is not an event id of this server (<run_id>:<seq>)"}


def test_a_run_nobody_comes_back_to_is_cancelled_after_the_window(server: Server) -> None:
    before = stats(server)
    client = open_stream(server, json={"n": 1000, "interval": 0.1})
    client.take(1)
    client.drop()
    left = time.monotonic()
    wait_for(
        lambda: stats(server)["resumable_finally"] == before["resumable_finally"] + 1, timeout=WINDOW + 10
    )
    # Not before the window: a reconnect had that long.
    assert time.monotonic() - left >= WINDOW - 0.2
    # Cancelled as a stream whose client left is: its finally saw disconnected().
    assert stats(server)["resumable_cancelled"] == before["resumable_cancelled"] + 1


def test_a_reconnect_within_the_window_keeps_the_run_going(server: Server) -> None:
    before = stats(server)
    client = open_stream(server, json={"n": 12, "interval": 0.25})
    first = client.take(1)
    client.drop()
    time.sleep(WINDOW / 2)
    rest = open_stream(server, headers={"Last-Event-ID": first[0].id}).rest()
    assert data(first + rest) == [str(i) for i in range(12)]
    after = stats(server)
    assert after["resumable_finally"] == before["resumable_finally"] + 1
    assert after["resumable_cancelled"] == before["resumable_cancelled"]


def test_two_clients_tail_one_run(server: Server) -> None:
    first = open_stream(server, json={"n": 5, "interval": 0.2})
    run_id = first.response.headers["X-Run-ID"]
    second = open_stream(server, "GET", f"/runs/{run_id}")
    assert data(first.rest()) == data(second.rest()) == ["0", "1", "2", "3", "4"]


def test_delete_cancels_a_run_and_its_followers_end(server: Server) -> None:
    before = stats(server)
    client = open_stream(server, json={"n": 1000, "interval": 0.1})
    run_id = client.response.headers["X-Run-ID"]
    client.take(2)
    response = requests.delete(f"{server.url}/runs/{run_id}", timeout=10)
    assert response.status_code == 204
    client.rest()  # the stream ends
    wait_for(lambda: stats(server)["resumable_finally"] == before["resumable_finally"] + 1, timeout=5)
    assert stats(server)["resumable_cancelled"] == before["resumable_cancelled"] + 1


def test_prefer_respond_async_answers_202_and_the_location_streams_from_the_start(server: Server) -> None:
    response = requests.post(
        f"{server.url}/resumable_ticks",
        json={"n": 4, "interval": 0.1},
        headers={"Prefer": "respond-async"},
        timeout=10,
    )
    assert response.status_code == 202
    run_id = response.json()["run_id"]
    assert response.headers["Location"] == f"/runs/{run_id}" == response.json()["events"]
    assert response.headers["Preference-Applied"] == "respond-async"
    assert data(open_stream(server, "GET", response.headers["Location"]).rest()) == ["0", "1", "2", "3"]


def test_get_binds_query_parameters_through_the_same_model(server: Server) -> None:
    client = open_stream(server, "GET", params={"n": "2", "interval": "0", "tags": ["a", "b"]})
    assert [event.data for event in client.rest()] == ['{"i":0,"tags":["a","b"]}', '{"i":1,"tags":["a","b"]}']
    # One value of a list parameter is a list of one.
    client = open_stream(server, "GET", params={"n": 1, "interval": 0, "tags": "solo"})
    assert data(client.rest()) == ['{"i":0,"tags":["solo"]}']
    response = requests.get(f"{server.url}/resumable_ticks", params={"n": "three"}, timeout=10)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["n"]
    response = requests.get(f"{server.url}/resumable_ticks", params={"n": 1, "nope": 1}, timeout=10)
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "extra_forbidden"


def test_functions_are_post_only_unless_they_say_otherwise(server: Server) -> None:
    response = requests.get(f"{server.url}/count", params={"n": 1}, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "OPTIONS, POST"
    response = requests.options(f"{server.url}/resumable_ticks", timeout=10)
    assert response.status_code == 204 and response.headers["Allow"] == "GET, OPTIONS, POST"


def test_a_position_older_than_the_buffer_gets_one_missed_event(server: Server) -> None:
    client = open_stream(server, json={"n": 20, "interval": 0})
    run_id = client.response.headers["X-Run-ID"]
    client.rest()
    # The run holds its last 8 events (SSE_RUN_RESUME_MAX_EVENTS): 13..20 of 20.
    events = open_stream(server, "GET", f"/runs/{run_id}", params={"last_event_id": 2}).rest()
    assert events[0].event == "missed" and events[0].data == '{"missed":10}'
    assert events[0].id == f"{run_id}:12"  # resuming after it is resuming at the first held
    assert data(events[1:]) == [str(i) for i in range(12, 20)]


def test_a_run_whose_generator_raises_ends_with_the_error_event_for_every_follower(server: Server) -> None:
    client = open_stream(server, "POST", "/resumable_fail", json={"n": 2})
    run_id = client.response.headers["X-Run-ID"]
    events = client.rest()
    assert data(events[:2]) == ["0", "1"] and events[2].event == "error"
    replay = open_stream(server, "GET", f"/runs/{run_id}", params={"last_event_id": 2}).rest()
    assert len(replay) == 1 and replay[0].event == "error" and replay[0].id == f"{run_id}:3"


def test_a_worker_that_holds_too_many_runs_answers_503_with_retry_after(tmp_path: Path) -> None:
    config = {**CONFIG, "SSE_RUN_MAX_RUNS": 2}
    with gunicorn(tmp_path=tmp_path, config=config) as srv:
        async_start = {"headers": {"Prefer": "respond-async"}, "json": {"n": 100, "interval": 0.1}}
        for _ in range(2):
            assert requests.post(f"{srv.url}/resumable_ticks", timeout=10, **async_start).status_code == 202
        refused = requests.post(f"{srv.url}/resumable_ticks", timeout=10, **async_start)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert "runs already" in refused.json()["error"]
        # Non-resumable functions are not held back.
        assert requests.post(f"{srv.url}/count", json={"n": 1}, timeout=10).status_code == 200


JWT_KEY = "k" * 32


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, JWT_KEY, algorithm="HS256")


def test_with_auth_a_run_is_reachable_only_with_the_starting_jwts_subject(tmp_path: Path) -> None:
    config = {**CONFIG, "SSE_RUN_JWT_KEY": JWT_KEY}
    with gunicorn(tmp_path=tmp_path, config=config) as srv:
        alice = {"Authorization": f"Bearer {token('alice')}"}
        bob = {"Authorization": f"Bearer {token('bob')}"}
        client = open_stream(srv, json={"n": 6, "interval": 0.2}, headers=alice)
        run_id = client.response.headers["X-Run-ID"]
        first = client.take(1)
        client.drop()
        # No token: 401, whether or not the run exists.
        for url in (f"/runs/{run_id}", f"/runs/{'f' * 32}"):
            assert requests.get(f"{srv.url}{url}", timeout=10).status_code == 401
        response = requests.post(
            f"{srv.url}/resumable_ticks", headers={"Last-Event-ID": first[0].id}, json={}, timeout=10
        )
        assert response.status_code == 401
        # Another subject: as if the run did not exist.
        reconnect = {"Last-Event-ID": first[0].id, **bob}
        assert (
            requests.post(f"{srv.url}/resumable_ticks", headers=reconnect, json={}, timeout=10).status_code
            == 204
        )
        for method in ("GET", "DELETE"):
            response = requests.request(method, f"{srv.url}/runs/{run_id}", headers=bob, timeout=10)
            assert response.status_code == 404 and response.json() == {"error": "no such run"}
        # The owner gets the rest.
        rest = open_stream(srv, headers={"Last-Event-ID": first[0].id, **alice}).rest()
        assert data(first + rest) == ["0", "1", "2", "3", "4", "5"]
        assert requests.delete(f"{srv.url}/runs/{run_id}", headers=alice, timeout=10).status_code == 204
