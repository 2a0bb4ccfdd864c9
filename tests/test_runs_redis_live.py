"""Runs across workers and replicas: two gunicorn servers (two gevent workers each) on one real
redis-server, as two replicas behind a load balancer would be."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.live import Server, gunicorn
from tests.redis_server import RedisServer
from tests.test_runs_live import Client, data, open_stream

WINDOW = 2.0


def config(url: str) -> dict[str, Any]:
    return {
        "SSE_RUN_REDIS_URL": url,
        "SSE_RUN_RESUME_WINDOW": WINDOW,
        "SSE_RUN_KEEPALIVE": 0.5,
        "SSE_RUN_REDIS_PREFIX": "replicas:",
    }


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@contextmanager
def two_replicas(
    urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory, **settings: Any
) -> Iterator[tuple[Server, Server]]:
    """Two gunicorn servers of two gevent workers each, on the Redis each URL names."""
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(
                gunicorn(
                    tmp_path=tmp_path_factory.mktemp("replica"),
                    config={**config(url), **settings},
                    env={"GUNICORN_WORKERS": "2"},
                )
            )
            for url in urls
        )
        yield a, b


@pytest.fixture(scope="module")
def replicas(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    with two_replicas((redis_server.url, redis_server.url), tmp_path_factory) as both:
        yield both


class Counters:
    """What the ``shared_ticks`` runs of one test counted in Redis."""

    def __init__(self, url: str, *, cluster: bool = False) -> None:
        self.label = uuid.uuid4().hex
        self._redis = (redis.RedisCluster if cluster else redis.Redis).from_url(url)

    def __getitem__(self, name: str) -> int:
        return int(self._redis.get(f"tests:{self.label}:{name}") or 0)

    def pid(self) -> int:
        return int(self._redis.get(f"tests:{self.label}:pid") or 0)

    def wait(self, name: str, value: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self[name] != value:
            assert time.monotonic() < deadline, f"{name} is {self[name]}, not {value}"
            time.sleep(0.05)


def test_a_run_started_on_one_replica_resumes_on_the_other_exactly_once(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    resume_on_the_other(*replicas, Counters(redis_server.url), events=8)


def resume_on_the_other(a: Server, b: Server, counters: Counters, events: int) -> str:
    """Start a run on ``a``, drop it after two events, resume it on ``b``: every event once, in
    order, and the generator ran once, to its end. Returns the run's id."""
    client = open_stream(
        a, path="/shared_ticks", json={"n": events, "interval": 0.2, "label": counters.label}
    )
    run_id = client.response.headers["X-Run-ID"]
    first = client.take(2)
    client.drop()
    again = open_stream(b, path="/shared_ticks", headers={"Last-Event-ID": first[-1].id}, json={})
    assert again.response.headers["X-Run-ID"] == run_id
    rest = again.rest()
    assert data(first + rest) == [str(i) for i in range(events)]  # every event once, in order
    assert [event.id for event in first + rest] == [f"{run_id}:{seq}" for seq in range(1, events + 1)]
    counters.wait("finally", 1, timeout=10)
    assert counters["started"] == 1 and counters["cancelled"] == 0  # it ran once, to its end
    return run_id


def test_runs_url_on_either_replica_follows_a_run_and_two_clients_tail_it(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    a, b = replicas
    counters = Counters(redis_server.url)
    first = open_stream(a, path="/shared_ticks", json={"n": 5, "interval": 0.2, "label": counters.label})
    run_id = first.response.headers["X-Run-ID"]
    second = open_stream(b, "GET", f"/runs/{run_id}")
    assert data(first.rest()) == data(second.rest()) == ["0", "1", "2", "3", "4"]
    replay = open_stream(b, "GET", f"/runs/{run_id}", params={"last_event_id": 3}).rest()
    assert data(replay) == ["3", "4"]
    done = requests.get(f"{b.url}/runs/{run_id}", params={"last_event_id": 5}, timeout=10)
    assert done.status_code == 204


def test_delete_on_one_replica_stops_the_generator_on_the_other(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    a, b = replicas
    counters = Counters(redis_server.url)
    started = requests.post(
        f"{a.url}/shared_ticks",
        json={"n": 10_000, "interval": 0.1, "label": counters.label},
        headers={"Prefer": "respond-async"},
        timeout=10,
    )
    assert started.status_code == 202
    counters.wait("started", 1, timeout=10)
    assert requests.delete(f"{b.url}{started.headers['Location']}", timeout=10).status_code == 204
    counters.wait("cancelled", 1, timeout=10)  # its finally saw disconnected(), on replica A
    assert counters["finally"] == 1


def test_the_window_ends_a_run_no_client_anywhere_came_back_to(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    a, _ = replicas
    counters = Counters(redis_server.url)
    client = open_stream(
        a, path="/shared_ticks", json={"n": 10_000, "interval": 0.1, "label": counters.label}
    )
    client.take(1)
    client.drop()
    dropped = time.monotonic()
    counters.wait("cancelled", 1, timeout=WINDOW + 15)
    assert time.monotonic() - dropped >= WINDOW - 0.3  # a reconnect had the whole window


def test_a_client_that_comes_back_within_the_window_on_the_other_replica_keeps_the_run(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    a, b = replicas
    counters = Counters(redis_server.url)
    client = open_stream(a, path="/shared_ticks", json={"n": 16, "interval": 0.25, "label": counters.label})
    first = client.take(1)
    client.drop()
    time.sleep(WINDOW / 2)
    rest = open_stream(b, path="/shared_ticks", headers={"Last-Event-ID": first[0].id}, json={}).rest()
    assert data(first + rest) == [str(i) for i in range(16)]
    counters.wait("finally", 1, timeout=10)
    assert counters["cancelled"] == 0


def test_unknown_runs_on_the_shared_store_are_204_and_404(replicas: tuple[Server, Server]) -> None:
    _, b = replicas
    unknown = "0" * 32
    response = requests.post(
        f"{b.url}/shared_ticks", headers={"Last-Event-ID": f"{unknown}:1"}, json={}, timeout=10
    )
    assert response.status_code == 204
    assert requests.get(f"{b.url}/runs/{unknown}", timeout=10).status_code == 404


def test_keys_live_under_the_configured_prefix(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    a, _ = replicas
    client = open_stream(a, "GET", "/resumable_ticks", params={"n": 1, "interval": 0})
    run_id = client.response.headers["X-Run-ID"]
    client.rest()
    keys = redis.Redis.from_url(redis_server.url).keys(f"*{run_id}*")
    base = f"replicas:run:{{{run_id}}}"  # ended: no lease left
    assert sorted(keys) == [base.encode(), f"{base}:events".encode()]


def test_a_redis_that_goes_away_and_comes_back(tmp_path: Path) -> None:
    store = RedisServer(tmp_path).start()
    try:
        with gunicorn(tmp_path=tmp_path, config=config(store.url)) as srv:
            client = open_stream(srv, path="/resumable_ticks", json={"n": 10_000, "interval": 0.1})
            client.take(1)
            store.stop()
            killed = time.monotonic()
            # The run already producing: one clear error event, and a clean end.
            rest = client.rest()
            assert rest[-1].event == "error" and "StoreUnavailable" in rest[-1].data, rest[-1]
            assert [event.event for event in rest].count("error") == 1
            assert time.monotonic() - killed < 30  # every Redis call has a timeout
            # A new run cannot start: 503 with Retry-After, quickly.
            refused = requests.post(f"{srv.url}/resumable_ticks", json={"n": 1}, timeout=30)
            assert refused.status_code == 503 and refused.headers["Retry-After"]
            assert refused.json() == {"error": "the run store is unavailable; try again shortly"}
            # Everything else still works, in the same worker.
            assert requests.post(f"{srv.url}/count", json={"n": 2}, timeout=10).status_code == 200
            assert requests.get(f"{srv.url}/health", timeout=10).json() == {"status": "ok"}
            # Redis back (empty: nothing was persisted): new runs work, without a restart.
            store.start()
            deadline = time.monotonic() + 30
            while True:
                response = requests.post(
                    f"{srv.url}/resumable_ticks", json={"n": 2, "interval": 0}, timeout=30
                )
                if response.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert response.status_code == 200 and response.headers["X-Run-ID"]
            assert srv.log().count("Booting worker") == 1  # the same worker throughout
    finally:
        store.stop()


def test_a_redis_with_a_password_works_and_the_password_is_never_logged(tmp_path: Path) -> None:
    password = "s3cret-" + uuid.uuid4().hex
    with RedisServer(tmp_path, password=password) as store:
        with gunicorn(tmp_path=tmp_path, config=config(store.url)) as srv:
            client = open_stream(srv, path="/resumable_ticks", json={"n": 3, "interval": 0})
            assert data(client.rest()) == ["0", "1", "2"]
            store.stop()  # errors are logged now: none of them may show the URL's password
            requests.post(f"{srv.url}/resumable_ticks", json={"n": 1}, timeout=30)
            log = srv.log()
    assert password not in log
    # A wrong password: 503s, and the password tried is not in the log either.
    with RedisServer(tmp_path, password=password) as store:
        wrong = "wrong-" + uuid.uuid4().hex
        with gunicorn(tmp_path=tmp_path, config=config(store.url.replace(password, wrong))) as srv:
            refused = requests.post(f"{srv.url}/resumable_ticks", json={"n": 1}, timeout=30)
            assert refused.status_code == 503
            assert wrong not in srv.log()


def test_a_replica_shutting_down_ends_its_runs_with_the_shutdown_event_for_every_reader(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    graceful = {"GUNICORN_GRACEFUL_TIMEOUT": "20"}
    with (
        gunicorn(tmp_path=tmp_path / "a", config=config(redis_server.url), env=graceful) as a,
        gunicorn(tmp_path=tmp_path / "b", config=config(redis_server.url)) as b,
    ):
        client = open_stream(a, path="/resumable_ticks", json={"n": 10_000, "interval": 0.1})
        run_id = client.response.headers["X-Run-ID"]
        first = client.take(1)
        os.kill(a.process.pid, signal.SIGTERM)
        rest = client.rest()  # the stream ends cleanly, with the shutdown event
        assert rest[-1].event == "shutdown"
        assert a.process.wait(timeout=20) == 0
        # The run ended with the shutdown event too: a client that reconnects to the other
        # replica reads how it ended, with its id, then nothing more.
        replay = open_stream(b, "GET", f"/runs/{run_id}", params={"last_event_id": first[0].id}).rest()
        assert replay[-1].event == "shutdown" and replay[-1].id.startswith(f"{run_id}:")
        last = replay[-1].id
        done = requests.get(f"{b.url}/runs/{run_id}", headers={"Last-Event-ID": last}, timeout=10)
        assert done.status_code == 204


# --- trust: stalls, outages, lost producers, cancels from anywhere --------------------------------


def _reconnect_in_background(server: Server, path: str, last_id: str) -> tuple[threading.Thread, list[Any]]:
    """A reconnect made now, read to its end in a thread: ``[status, events]`` once done."""
    result: list[Any] = []

    def reconnect() -> None:
        response = requests.get(
            f"{server.url}{path}",
            headers={"Accept": "text/event-stream", "Last-Event-ID": last_id},
            stream=True,
            timeout=30,
        )
        result.extend([response.status_code, Client(response).rest()])

    thread = threading.Thread(target=reconnect)
    thread.start()
    return thread, result


@pytest.mark.parametrize("stall", ["client-pause", "sigstop"])
def test_a_redis_stall_shorter_than_the_bound_loses_nothing_for_any_follower(
    replicas: tuple[Server, Server], redis_server: RedisServer, stall: str
) -> None:
    # A 6 s stall cut runs short, silently: the producer's append timed out and its generator
    # was gone, the followers got pings for two minutes, then a clean end and 204. A stopped
    # (not paused) Redis runs, once it goes on, the append its producer gave up on after 2 s and
    # sent again: the second was refused ("ID ... equal or smaller"), and the run ended with a
    # false StoreUnavailable error.
    a, b = replicas
    counters = Counters(redis_server.url)
    client = open_stream(a, path="/shared_ticks", json={"n": 40, "interval": 0.1, "label": counters.label})
    run_id = client.response.headers["X-Run-ID"]
    follower = open_stream(b, "GET", f"/runs/{run_id}")
    first = client.take(5)
    assert redis_server.process is not None
    pid = redis_server.process.pid
    resume = threading.Timer(3.5, os.kill, (pid, signal.SIGCONT))
    if stall == "sigstop":
        os.kill(pid, signal.SIGSTOP)
        resume.start()
    else:
        admin = redis.Redis.from_url(redis_server.url)
        admin.execute_command("CLIENT", "PAUSE", 4000, "ALL")
        admin.close()
    try:
        # A client that reconnects during the stall gets 200 and waits (EventSource gives up
        # for good on anything else), then every event after its position.
        time.sleep(0.5)
        thread, reconnect = _reconnect_in_background(b, f"/runs/{run_id}", first[-1].id)
        rest = client.rest()
        thread.join(60)
    finally:
        if stall == "sigstop":
            resume.join()
            os.kill(pid, signal.SIGCONT)
    everything = [str(i) for i in range(40)]
    assert data(first + rest) == everything  # once each, in order, and no error
    assert data(follower.rest()) == everything
    assert reconnect[0] == 200 and data(reconnect[1]) == everything[5:]
    counters.wait("finally", 1, timeout=10)
    assert counters["cancelled"] == 0  # the generator ran to its end
    done = requests.get(f"{a.url}/runs/{run_id}", params={"last_event_id": 40}, timeout=10)
    assert done.status_code == 204


def test_a_redis_away_longer_than_the_bound_ends_the_run_with_an_error_everyone_is_told(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    outage = {**config(redis_server.url), "SSE_RUN_STORE_OUTAGE": 2}
    with gunicorn(tmp_path=tmp_path, config=outage) as srv:
        client = open_stream(srv, path="/resumable_ticks", json={"n": 10_000, "interval": 0.1})
        run_id = client.response.headers["X-Run-ID"]
        first = client.take(3)
        assert redis_server.process is not None
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        try:
            rest = client.rest()  # pings while it waits, then the reason, then the end
            assert rest and rest[-1].event == "error", rest
            assert json.loads(rest[-1].data)["type"] == "StoreUnavailable"
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        # Redis back: the run's end is stored as the error it was. A reconnect is told, not 204.
        last = [event for event in first + rest if event.id][-1].id
        deadline = time.monotonic() + 20
        while True:
            replay = requests.get(
                f"{srv.url}/runs/{run_id}", headers={"Last-Event-ID": last}, stream=True, timeout=30
            )
            assert replay.status_code == 200, replay.status_code
            told = Client(replay).rest()
            if told and told[-1].id:
                break
            assert time.monotonic() < deadline, told  # the end not stored yet: try again
            time.sleep(0.5)
        assert told[-1].event == "error" and json.loads(told[-1].data)["type"] == "StoreUnavailable"
        assert (
            requests.get(
                f"{srv.url}/runs/{run_id}", headers={"Last-Event-ID": told[-1].id}, timeout=10
            ).status_code
            == 204
        )
        assert requests.get(f"{srv.url}/runs/{run_id}", timeout=10).status_code == 200
        assert srv.log().count("Booting worker") == 1


def test_a_killed_producer_is_reported_to_followers_on_every_replica_and_later_reconnects(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    delete_on_the_other(*replicas, Counters(redis_server.url))


def delete_on_the_other(a: Server, b: Server, counters: Counters) -> None:
    """A run started on ``a``, followed on both, deleted on ``b``: every follower's last event
    says ``RunCancelled``, and the generator on ``a`` stopped."""
    client = open_stream(
        a, path="/shared_ticks", json={"n": 10_000, "interval": 0.1, "label": counters.label}
    )
    run_id = client.response.headers["X-Run-ID"]
    followers = [open_stream(server, "GET", f"/runs/{run_id}") for server in (a, b)]
    for follower in [client, *followers]:
        follower.take(2)
    deleted = time.monotonic()
    assert requests.delete(f"{b.url}/runs/{run_id}", timeout=10).status_code == 204
    for follower in [client, *followers]:
        last = follower.rest()[-1]
        assert last.event == "error" and json.loads(last.data)["type"] == "RunCancelled", last
    assert time.monotonic() - deleted < 10  # within a second on a quiet machine: no polling
    counters.wait("cancelled", 1, timeout=10)  # and the generator on replica A stopped
