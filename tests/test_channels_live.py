"""Channels with the real parts: two gunicorn replicas (two gevent workers each) on one real
redis-server, publishers in other processes (a job, ``flask sse publish``), a generator on one
replica, headless Chromium through a proxy that cuts its connection, a Redis that stops, and
the subscriptions each worker holds in Redis."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from flask_sse_run.channels.hub import LINGER
from flask_sse_run.channels.names import channel_run_id
from flask_sse_run.testing import ServerSentEvent, SSEParser
from tests.browser import chromium
from tests.channel_app import DEFAULTS, create_app, sse
from tests.live import ROOT, Server, gunicorn
from tests.redis_server import RedisServer
from tests.tcp_proxy import CuttableProxy

PREFIX = DEFAULTS["SSE_RUN_REDIS_PREFIX"]
APP = "tests.channel_app:create_app()"
OUTAGE = 2  # SSE_RUN_STORE_OUTAGE of the server whose Redis stops


def unique(label: str) -> str:
    """A channel name no other test (or run) uses."""
    return f"{label}.{uuid.uuid4().hex[:12]}"


def compact(value: Any) -> str:
    """What a client reads as the data of ``value`` published: its compact JSON."""
    return json.dumps(value, separators=(",", ":"))


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@contextmanager
def replica(url: str, tmp_path: Path, workers: int = 2, **config: Any) -> Iterator[Server]:
    """One gunicorn server of the channel app (``workers`` gevent workers) on the Redis at ``url``."""
    env = {"GUNICORN_WORKERS": str(workers), "CHANNEL_APP_REDIS_URL": url}
    with gunicorn(APP, tmp_path=tmp_path, config=config, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def replicas(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(replica(redis_server.url, tmp_path_factory.mktemp("replica")))
            for _ in range(2)
        )
        yield a, b


Publish = Callable[..., str]


def publisher(url: str, **config: Any) -> Publish:
    """``publish(channel, data, event=None)`` from this process, on the Redis at ``url``."""
    app = create_app(SSE_RUN_REDIS_URL=url, **config)

    def publish(channel: str, data: Any, event: str | None = None) -> str:
        return sse.publish(channel, data, event, app=app)

    return publish


@pytest.fixture(scope="module")
def publish(redis_server: RedisServer) -> Publish:
    return publisher(redis_server.url)


# --- a subscriber: one streaming GET, read by a thread of its own -------------------------------


def channels_path(channels: list[str]) -> str:
    if len(channels) == 1:
        return f"/channels/{channels[0]}"
    return "/channels?" + urllib.parse.urlencode([("channel", name) for name in channels])


class Subscriber:
    """``GET /channels...`` on ``server``, its events gathered as they come, every wait bounded.

    A refused subscription keeps its status and body (``status``, ``body``) and reads nothing.
    """

    def __init__(self, server: Server, channels: list[str], last_event_id: str | None = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.connection.request("GET", channels_path(channels), headers=headers)
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.headers = self.response.headers
        self.body = b""
        self.raw = bytearray()  # every byte of the stream, for its first block
        self.events: list[ServerSentEvent] = []
        self.ended = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        if self.status != 200:
            self.body = self.response.read()
            self.connection.close()
            self.ended = True
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        parser = SSEParser()
        try:
            while True:
                chunk = self.response.read1(65536)
                if not chunk:
                    break
                events = parser.feed(chunk)
                with self._changed:
                    self.raw += chunk
                    self.events.extend(events)
                    self._changed.notify_all()
        except (OSError, http.client.HTTPException, ValueError):
            pass  # shut down under it (close()), or cut
        finally:
            self.connection.close()  # here, not in close(): http.client is not thread-safe
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 20) -> list[ServerSentEvent]:
        """The first ``count`` events, once they are here (``AssertionError`` after ``timeout``)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.events) >= count or self.ended, timeout)
            events = list(self.events)
        assert len(events) >= count, f"{len(events)} events of {count} (ended: {self.ended}): {events}"
        return events[:count]

    def wait_end(self, timeout: float) -> list[ServerSentEvent]:
        """Every event, once the server ended the stream (``AssertionError`` after ``timeout``)."""
        with self._changed:
            ended = self._changed.wait_for(lambda: self.ended, timeout)
            events = list(self.events)
        assert ended, f"the stream did not end in {timeout} s: {events}"
        return events

    def close(self) -> None:
        """Leave: the connection goes (shut down, which wakes the reading thread)."""
        sock = self.connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive(), "the reader did not stop"
        self.connection.close()


@contextmanager
def subscribed(server: Server, channels: list[str], count: int = 1) -> Iterator[list[Subscriber]]:
    """``count`` subscribers of ``channels`` on ``server``, ready (200 and the first block read)."""
    subscribers: list[Subscriber] = []
    try:
        for _ in range(count):
            subscriber = Subscriber(server, channels)
            subscribers.append(subscriber)
            assert subscriber.status == 200, (subscriber.status, subscriber.body)
        for subscriber in subscribers:
            started(subscriber, channels)
        yield subscribers
    finally:
        for subscriber in subscribers:
            subscriber.close()


def started(subscriber: Subscriber, channels: list[str], timeout: float = 10) -> bytes:
    """The stream's first block, a bare ``id:`` line (it sets lastEventId, dispatches nothing)."""
    with subscriber._changed:
        subscriber._changed.wait_for(lambda: b"\n\n" in subscriber.raw or subscriber.ended, timeout)
        head = bytes(subscriber.raw)
    first = head.split(b"\n\n", 1)[0]
    assert re.fullmatch(rb"id: [^\n]+", first), head[:200]
    assert [part.rsplit(b":", 1)[0].decode() for part in first[4:].split(b",")] == channels, first
    return first


def seen(events: list[ServerSentEvent]) -> list[tuple[str, str, str]]:
    return [(event.event, event.id, event.data) for event in events]


# --- 1: every subscriber on both replicas, every event once, in order ---------------------------

EVENTS = 30


def test_every_subscriber_on_both_replicas_gets_every_event_once_in_order(
    replicas: tuple[Server, Server], publish: Publish
) -> None:
    a, b = replicas
    name = unique("news")
    with subscribed(a, [name], 4) as on_a, subscribed(b, [name], 4) as on_b:
        ids = [publish(name, {"i": i}) for i in range(EVENTS)]
        assert ids == [f"{name}:{seq}" for seq in range(1, EVENTS + 1)]
        assert publish(name, "the end", event="end") == f"{name}:{EVENTS + 1}"
        expected = [("message", f"{name}:{i + 1}", compact({"i": i}))
                    for i in range(EVENTS)]  # fmt: skip
        expected.append(("end", f"{name}:{EVENTS + 1}", "the end"))
        for subscriber in on_a + on_b:
            assert seen(subscriber.wait_for(EVENTS + 1)) == expected
        # Nothing more: no event came twice (each stream holds the end event last).
        time.sleep(0.3)
        for subscriber in on_a + on_b:
            assert len(subscriber.events) == EVENTS + 1
        # A client that reconnects to the other replica with its Last-Event-ID resumes exactly.
        middle = f"{name}:{EVENTS // 2}"
        for server in (a, b):
            again = Subscriber(server, [name], last_event_id=middle)
            try:
                assert again.status == 200
                assert started(again, [name]) == f"id: {middle}".encode()
                assert seen(again.wait_for(EVENTS + 1 - EVENTS // 2)) == expected[EVENTS // 2 :]
            finally:
                again.close()


def test_a_reconnect_to_a_worker_that_follows_nothing_gets_what_it_missed_at_once(
    replicas: tuple[Server, Server], publish: Publish
) -> None:
    # No worker anywhere follows the channel: the reconnect makes the feed, whose cache is empty
    # and starts at the newest event; the client, behind it, must read the store.
    _, b = replicas
    name, other = unique("quiet"), unique("other")
    for i in range(1, 6):
        publish(name, f"e{i}")
    publish(other, "o1")
    for channels, last_id, expected in (
        ([name], f"{name}:2", [("message", f"{name}:{i}", f"e{i}") for i in (3, 4, 5)]),
        ([other, name], f"{other}:1,{name}:3",
         [("message", f"{other}:1,{name}:{i}", f"e{i}") for i in (4, 5)]),
    ):  # fmt: skip
        again = Subscriber(b, channels, last_event_id=last_id)
        try:
            assert again.status == 200
            assert seen(again.wait_for(len(expected), timeout=10)) == expected
        finally:
            again.close()


def test_a_reconnect_behind_the_channels_history_is_told_how_many_events_it_missed(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    _, b = replicas
    name = unique("history")
    publish = publisher(redis_server.url, SSE_RUN_CHANNEL_HISTORY=5)  # the publisher trims
    for i in range(1, 21):
        publish(name, f"e{i}")
    again = Subscriber(b, [name], last_event_id=f"{name}:3")
    try:
        assert again.status == 200
        events = again.wait_for(6, timeout=10)
        # 4 to 15 are gone (the history holds 16 to 20): one missed event says so, and where
        # the stream stands after it; then the rest, once each.
        assert seen(events) == [
            ("missed", f"{name}:15", compact({"channel": name, "missed": 12})),
            *[("message", f"{name}:{i}", f"e{i}") for i in range(16, 21)],
        ]
        time.sleep(0.3)
        assert len(again.events) == 6
    finally:
        again.close()


def in_turn(events: list[ServerSentEvent], start: dict[str, int]) -> dict[str, list[str]]:
    """Each channel's data as a stream of the channels ``start`` names (in the request's order,
    at those positions) gave them, checking that each event's id holds every channel's position
    as it stood after that event: exactly one channel moved, by one. A stream reads its channels
    in turn, so their events interleave in any order; each channel's stay in order."""
    positions = dict(start)
    got: dict[str, list[str]] = {name: [] for name in start}
    for event in events:
        ids = {name: int(seq) for name, seq in (part.rsplit(":", 1) for part in event.id.split(","))}
        assert list(ids) == list(start), event
        moved = [name for name in start if ids[name] != positions[name]]
        assert len(moved) == 1 and ids[moved[0]] == positions[moved[0]] + 1, (event, positions)
        positions = ids
        got[moved[0]].append(event.data)
    return got


def test_a_stream_of_two_channels_on_the_other_replica_carries_both_positions(
    replicas: tuple[Server, Server], publish: Publish
) -> None:
    a, b = replicas
    x, y = unique("x"), unique("y")
    publish(y, "y-1")  # read by no one: the streams start after it
    with subscribed(b, [x, y], 2) as on_b, subscribed(a, [y], 1) as on_a:
        for subscriber in on_b:
            assert started(subscriber, [x, y]) == f"id: {x}:0,{y}:1".encode()
        publish(x, "x-1")
        publish(y, "y-2")
        publish(x, "x-2")
        for subscriber in on_b:
            events = subscriber.wait_for(3)
            assert in_turn(events, {x: 0, y: 1}) == {x: ["x-1", "x-2"], y: ["y-2"]}
            assert events[-1].id == f"{x}:2,{y}:2"
        assert seen(on_a[0].wait_for(1)) == [("message", f"{y}:2", "y-2")]
    # Resumed on the other replica from a composite id: each channel from its own position.
    publish(y, "y-3")
    again = Subscriber(a, [x, y], last_event_id=f"{x}:1,{y}:1")
    try:
        assert again.status == 200
        events = again.wait_for(3)
        assert in_turn(events, {x: 1, y: 1}) == {x: ["x-2"], y: ["y-2", "y-3"]}
        assert events[-1].id == f"{x}:2,{y}:3"
    finally:
        again.close()


def test_a_channel_lost_and_made_again_by_a_publish_starts_over_for_its_subscribers(
    replicas: tuple[Server, Server], redis_server: RedisServer, publish: Publish
) -> None:
    # Its keys go while clients follow it (what a Redis that restarts empty, a failover to a
    # replica behind, or an eviction does), and publishers go on at once: seqs from 1 again.
    a, _ = replicas
    x, y = unique("lost"), unique("kept")
    with subscribed(a, [x]) as (single,), subscribed(a, [x, y]) as (pair,):
        publish(x, "x-1")
        publish(x, "x-2")
        assert len(single.wait_for(2)) == 2 and len(pair.wait_for(2)) == 2
        admin = redis.Redis.from_url(redis_server.url)
        key = f"{PREFIX}run:{{{channel_run_id(x)}}}"
        assert admin.delete(key, f"{key}:events") == 2
        admin.close()
        for i in (1, 2, 3):
            publish(x, f"again-{i}")
        again = [f"again-{i}" for i in (1, 2, 3)]
        assert [event.data for event in single.wait_for(5, timeout=5)] == ["x-1", "x-2", *again]
        assert [event.data for event in pair.wait_for(5, timeout=5)] == ["x-1", "x-2", *again]


# --- 2: publishers in processes of their own ----------------------------------------------------

JOB = """
import sys
from tests.channel_app import create_app, sse

app = create_app()
with app.app_context():  # what an RQ or Celery job does
    for i in range(int(sys.argv[2])):
        print(sse.publish(sys.argv[1], {"job": i}, event="job"), flush=True)
"""


def run_process(args: list[str], redis_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHANNEL_APP_REDIS_URL": redis_url}
    env.pop("TEST_APP_CONFIG", None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_job_process_and_the_cli_publish_to_subscribers_on_both_replicas(
    replicas: tuple[Server, Server], redis_server: RedisServer
) -> None:
    a, b = replicas
    name = unique("jobs")
    jobs = 12
    with subscribed(a, [name], 2) as on_a, subscribed(b, [name], 2) as on_b:
        done = run_process([sys.executable, "-c", JOB, name, str(jobs)], redis_server.url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [f"{name}:{seq}" for seq in range(1, jobs + 1)]
        cli = [sys.executable, "-m", "flask", "--app", "tests.channel_app", "sse", "publish"]
        said = run_process(
            [*cli, name, '{"done": true, "of": 12}', "--json", "--event", "done"], redis_server.url
        )
        assert (said.returncode, said.stdout) == (0, f"{name}:{jobs + 1}\n"), said.stderr
        said = run_process([*cli, name, "plain words"], redis_server.url)
        assert (said.returncode, said.stdout) == (0, f"{name}:{jobs + 2}\n"), said.stderr
        expected = [("job", f"{name}:{i + 1}", compact({"job": i})) for i in range(jobs)]
        expected += [("done", f"{name}:{jobs + 1}", '{"done":true,"of":12}'),
                     ("message", f"{name}:{jobs + 2}", "plain words")]  # fmt: skip
        for subscriber in on_a + on_b:
            assert seen(subscriber.wait_for(jobs + 2)) == expected
        time.sleep(0.3)
        assert all(len(subscriber.events) == jobs + 2 for subscriber in on_a + on_b)


# --- 3: a generator on one replica, its progress on the other -----------------------------------


def test_a_generator_on_one_replica_publishes_progress_a_subscriber_on_the_other_sees(
    replicas: tuple[Server, Server],
) -> None:
    a, b = replicas
    name = unique("import")
    steps = 8
    with subscribed(b, [name], 3) as on_b, subscribed(a, [name], 1) as on_a:
        response = requests.post(
            f"{a.url}/progress",
            json={"channel": name, "n": steps, "interval": 0.05},
            headers={"Accept": "text/event-stream"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        own = SSEParser().feed(response.content)
        assert [event.data for event in own] == [compact({"step": i, "of": steps}) for i in range(steps)]
        expected = [("progress", f"{name}:{i + 1}", own[i].data) for i in range(steps)]
        for subscriber in on_b + on_a:
            assert seen(subscriber.wait_for(steps)) == expected


# --- 4: Chromium's EventSource through a cut connection -----------------------------------------


class GatedProxy(CuttableProxy):
    """A :class:`CuttableProxy` that can hold new connections (``gate`` cleared): accepted, but
    not passed on to the server until the gate opens, so a reconnect waits for the test."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.gate = threading.Event()
        self.gate.set()
        super().__init__(target)

    def _accepted(self) -> None:
        self.gate.wait(60)


def browser_wait(driver: Any, script: str, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            state = driver.execute_script(
                "return [window.received, window.opens, window.errors, window.source.readyState]"
            )
            raise AssertionError(f"timed out waiting for {what}; the page has {state}")
        time.sleep(0.05)


def cut_while(driver: Any, proxy: GatedProxy, cuts: int, publishing: Callable[[], None]) -> None:
    """Cut the browser's connection, publish while it is away (its reconnect held at the proxy),
    then let it reconnect; ``cuts``: how many the browser has seen with this one."""
    before = driver.execute_script("return window.received.length")
    proxy.gate.clear()
    assert proxy.cut() >= 1
    publishing()
    browser_wait(driver, f"return window.errors >= {cuts}", 20, "the browser to see the cut")
    time.sleep(0.3)
    assert driver.execute_script("return window.received.length") == before  # nothing got through
    proxy.gate.set()


def test_chromium_follows_two_channels_through_cuts_every_event_once_in_order(
    replicas: tuple[Server, Server], publish: Publish, tmp_path: Path
) -> None:
    a, _ = replicas
    x, y = unique("a"), unique("b")

    def both(seqs: range) -> None:
        for i in seqs:
            publish(x, f"{x}-{i}")
            publish(y, f"{y}-{i}")

    def count(n: int) -> str:
        return f"return window.received.length >= {n}"

    proxy = GatedProxy(("127.0.0.1", a.port))
    try:
        with chromium(tmp_path) as driver:
            driver.get(f"{proxy.url}/page?channel={x}&channel={y}")
            browser_wait(driver, "return window.opens === 1", 30, "the EventSource to open")
            # Cut before any event: the stream's first block (an id, no event) is where the
            # browser resumes from, not from whenever it reconnects.
            time.sleep(0.5)  # the first block read, after the open event
            cut_while(driver, proxy, 1, lambda: both(range(1, 2)))
            browser_wait(driver, count(2), 30, "the events of the first cut")
            both(range(2, 6))
            browser_wait(driver, count(10), 20, "ten events")

            # Cut mid-way: both channels resume from the id of the last event the browser got.
            def during() -> None:
                both(range(6, 11))
                publish(x, f"{x}-11")  # one channel ahead of the other

            cut_while(driver, proxy, 2, during)
            browser_wait(driver, count(21), 30, "the events of the second cut")
            publish(y, f"{y}-11")  # after the reconnect
            publish(x, f"{x}-12")
            browser_wait(driver, count(23), 20, "the events after the reconnect")
            time.sleep(0.3)
            received = driver.execute_script("return window.received")
            opens = driver.execute_script("return window.opens")
    finally:
        sent = b"".join(proxy.requests()).decode("latin-1")
        proxy.close()
    assert opens == 3
    assert all(kind == "message" for kind, _, _ in received), received
    # Each channel's events once, in order; and each event's id holds both positions as they
    # stood after it (so a reconnect at any event resumes both channels exactly).
    # (The channel whose position moved at each event is the one whose data it carries.)
    events = [ServerSentEvent(data=text, id=event_id) for _, event_id, text in received]
    assert in_turn(events, {x: 0, y: 0}) == {
        x: [f"{x}-{i}" for i in range(1, 13)],
        y: [f"{y}-{i}" for i in range(1, 12)],
    }
    # The browser reconnected by itself, twice, each time from where the cut left it.
    streams = re.findall(r"GET (/channels\?[^ ]+) HTTP/1\.1\r\n", sent)
    assert streams == [f"/channels?channel={x}&channel={y}"] * 3, sent
    resumed = re.findall(r"(?i)\r\nlast-event-id: ([^\r]+)\r\n", sent)
    assert resumed == [f"{x}:0,{y}:0", f"{x}:5,{y}:5"], sent


# --- 5: Redis stops while clients follow channels -----------------------------------------------


@pytest.mark.parametrize("outage", ["sigstop", "killed"])
def test_a_redis_that_stops_ends_the_streams_with_an_error_refuses_new_ones_then_recovers(
    tmp_path: Path, outage: str
) -> None:
    # sigstop: Redis stops answering (its sockets stay open), then goes on with its data.
    # killed: its connections are refused, and it comes back empty (the channels start over).
    x, y = unique("x"), unique("y")
    waiting: Subscriber | None = None
    with (
        RedisServer(tmp_path) as store,
        replica(store.url, tmp_path, SSE_RUN_STORE_OUTAGE=OUTAGE, SSE_RUN_KEEPALIVE=0.5) as server,
    ):
        publish = publisher(store.url)
        with subscribed(server, [x], 2) as singles, subscribed(server, [x, y], 2) as pairs:
            publish(x, "before")
            for subscriber in singles + pairs:
                assert [event.data for event in subscriber.wait_for(1)] == ["before"]
            assert store.process is not None
            pid = store.process.pid
            if outage == "sigstop":
                os.kill(pid, signal.SIGSTOP)
            else:
                store.stop()
            try:
                stopped = time.monotonic()
                for subscriber in singles + pairs:
                    events = subscriber.wait_end(timeout=OUTAGE + 30)  # never hangs
                    assert [event.event for event in events] == ["message", "error"], events
                    assert json.loads(events[-1].data)["type"] == "StoreUnavailable"
                assert time.monotonic() - stopped < OUTAGE + 30
                # Meanwhile a new subscription is refused, as JSON, with Retry-After.
                refused = Subscriber(server, [x])
                assert refused.status == 503, (refused.status, refused.body)
                assert refused.headers["Content-Type"].startswith("application/json")
                assert refused.headers["Retry-After"]
                assert "error" in json.loads(refused.body)
                if outage == "sigstop":
                    # But a browser's reconnect (Last-Event-ID) is answered 200 and waits for
                    # the store: EventSource gives up for good on a 503.
                    waiting = Subscriber(server, [x], last_event_id=f"{x}:1")
                    assert waiting.status == 200, (waiting.status, waiting.body)
            finally:
                if outage == "sigstop":
                    os.kill(pid, signal.SIGCONT)
                else:
                    store.start()
        # Redis back: subscribing works again, and so does what is published. A client that
        # comes back with its Last-Event-ID resumes (on a Redis that came back empty: from the
        # channel's new start).
        deadline = time.monotonic() + 30
        while True:
            again = Subscriber(server, [x, y], last_event_id=f"{x}:1,{y}:0")
            if again.status == 200:
                break
            assert again.status == 503 and time.monotonic() < deadline, again.status
            time.sleep(0.2)
        try:
            x_seq = 1 if outage == "sigstop" else 0
            assert started(again, [x, y]) == f"id: {x}:{x_seq},{y}:0".encode()
            publish(y, "after")
            publish(x, "x after")
            assert in_turn(again.wait_for(2), {x: x_seq, y: 0}) == {x: ["x after"], y: ["after"]}
            if waiting is not None:  # the reconnect that waited resumed where it was
                assert seen(waiting.wait_for(1)) == [("message", f"{x}:2", "x after")]
                assert f"id: {x}:1\n\n".encode() in waiting.raw  # after the pings, if any
        finally:
            again.close()
            if waiting is not None:
                waiting.close()
        assert server.log().count("Booting worker") == 2  # the same workers throughout


# --- 6: one subscription per worker, gone once the clients are --------------------------------


def shard_subscribers(client: redis.Redis, name: str) -> int:
    key = f"{PREFIX}run:{{{channel_run_id(name)}}}:changed"
    reply: list[Any] = client.execute_command("PUBSUB", "SHARDNUMSUB", key)  # type: ignore[no-untyped-call]
    return int(reply[1])


def test_many_clients_of_a_channel_hold_one_subscription_per_worker_until_they_leave(
    replicas: tuple[Server, Server], redis_server: RedisServer, publish: Publish
) -> None:
    a, _ = replicas
    name = unique("crowd")
    admin = redis.Redis.from_url(redis_server.url)
    try:
        with subscribed(a, [name], 20) as clients:
            deadline = time.monotonic() + 10
            while shard_subscribers(admin, name) == 0:
                assert time.monotonic() < deadline, "no worker subscribed"
                time.sleep(0.05)
            publish(name, "hello")
            for subscriber in clients:
                assert seen(subscriber.wait_for(1)) == [("message", f"{name}:1", "hello")]
            assert 1 <= shard_subscribers(admin, name) <= 2  # one per worker, not per client
        left = time.monotonic()
        assert shard_subscribers(admin, name) >= 1  # a feed lingers for a reconnect
        deadline = left + LINGER + 15
        while shard_subscribers(admin, name) != 0:
            assert time.monotonic() < deadline, "the workers still follow a channel no one reads"
            time.sleep(0.1)
        assert time.monotonic() - left >= LINGER - 0.5  # not before the linger
    finally:
        admin.close()
