"""Channels, in process: names and ids, the stores' ``open_channel`` and ``publish`` (in-process
and a real redis-server), and the URLs through Flask's test client (threaded mode: a stream's
body runs in the thread that reads it, so every read here runs in a thread of its own, joined
with a timeout). The live behaviour under gunicorn and gevent is tested elsewhere.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import redis
from flask import Flask
from werkzeug.test import TestResponse

from flask_sse_run import ConfigurationError, RegistrationError, SSERun
from flask_sse_run.channels import hub as hub_module
from flask_sse_run.channels.hub import Hub
from flask_sse_run.channels.names import (
    CHANNEL_PREFIX,
    MAX_CHANNELS,
    MAX_NAME,
    channel_run_id,
    format_position,
    is_channel_name,
    parse_position,
)
from flask_sse_run.channels.stream import ChannelStream
from flask_sse_run.registry import EXTENSION_KEY, State
from flask_sse_run.runs.memory import MemoryRunStore
from flask_sse_run.runs.redis_store import RedisRunStore
from flask_sse_run.runs.store import RunStore, StoreUnavailable
from tests.live import free_port
from tests.redis_server import RedisCluster, RedisServer

TOKEN = "static-token-0123456789"
SECRET = "a-jwt-secret-that-is-32-bytes-ok"
WAIT = 10.0  # the longest any wait of these tests lasts (they end far sooner)


def wait_for(condition: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_jwt(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")


# -- reading a stream ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One block of a stream as sent (``None``: no such field): a bare ``id:`` block too."""

    id: str | None
    event: str | None
    data: str | None

    @property
    def bare(self) -> bool:
        return self.event is None and self.data is None

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


def parse_block(raw: bytes) -> Block | None:
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in raw.decode().split("\n"):
        if line.startswith(":"):
            continue  # a keep-alive comment
        name, sep, value = line.partition(": ")
        assert sep, f"a line the encoder never writes: {line!r}"
        if name == "data":
            data.append(value)
        else:
            assert name not in fields, f"{name} twice in one block: {raw!r}"
            fields[name] = value
    if not fields and not data:
        return None
    return Block(fields.get("id"), fields.get("event"), "\n".join(data) if data else None)


class Stream:
    """A streamed test-client response, read in a thread (a read blocks while nothing comes)."""

    def __init__(self, response: TestResponse, wake: Callable[[], None]) -> None:
        self.response = response
        self.status_code = response.status_code
        self.blocks: list[Block] = []
        self.taken = 0
        self.ended = False
        self.error: BaseException | None = None
        self._chunks = iter(response.response)
        self._buffer = b""
        self._target = 0
        self._cond = threading.Condition()
        self._pump: threading.Thread | None = None
        self._wake = wake
        self._closed = False

    def _run(self) -> None:
        while True:
            with self._cond:
                if len(self.blocks) >= self._target or self.ended:
                    self._pump = None
                    self._cond.notify_all()
                    return
            chunk: bytes | None
            try:
                chunk = next(self._chunks)
            except StopIteration:
                chunk = None
            except BaseException as exc:  # shown by the test that waits
                self.error, chunk = exc, None
            with self._cond:
                if chunk is None:
                    self.ended = True
                else:
                    self._buffer += chunk
                    *done, self._buffer = self._buffer.split(b"\n\n")
                    self.blocks.extend(block for block in map(parse_block, done) if block is not None)
                self._cond.notify_all()

    def take(self, count: int, timeout: float = WAIT) -> list[Block]:
        """The next ``count`` blocks, or AssertionError after ``timeout``."""
        with self._cond:
            want = self.taken + count
            self._target = max(self._target, want)
            if self._pump is None and not self.ended:
                self._pump = threading.Thread(target=self._run, daemon=True)
                self._pump.start()
            self._cond.wait_for(lambda: len(self.blocks) >= want or self.ended, timeout)
            got = self.blocks[self.taken : want]
            assert self.error is None, f"the stream failed: {self.error!r}"
            assert len(got) == count, f"expected {count} more blocks, got {got} (ended: {self.ended})"
            self.taken = want
            return got

    def rest(self, timeout: float = WAIT) -> list[Block]:
        """Every block until the stream ends (AssertionError if it does not in ``timeout``)."""
        with self._cond:
            self._target = 1 << 30
            if self._pump is None and not self.ended:
                self._pump = threading.Thread(target=self._run, daemon=True)
                self._pump.start()
            assert self._cond.wait_for(lambda: self.ended, timeout), f"the stream did not end: {self.blocks}"
            got, self.taken = self.blocks[self.taken :], len(self.blocks)
            return got

    def first(self) -> str:
        """The stream's opening block: a bare ``id:`` line; its value."""
        (block,) = self.take(1)
        assert block.bare and block.id is not None, block
        return block.id

    def events(self, count: int, timeout: float = WAIT) -> list[Block]:
        blocks = self.take(count, timeout)
        assert not any(block.bare for block in blocks), blocks
        return blocks

    def close(self) -> None:
        if self._closed:
            return
        pump = self._pump
        if pump is not None and pump.is_alive():
            try:
                self._wake()  # an event unblocks the read in progress
            except Exception:
                pass
            pump.join(5)
        if pump is None or not pump.is_alive():
            self._closed = True
            self.response.close()


# -- apps and stores -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    # A feed stops soon after its last client, and looks often whether it has any.
    monkeypatch.setattr(hub_module, "LINGER", 0.05)
    monkeypatch.setattr(hub_module, "FEED_WAIT", 0.2)


class Env:
    """Makes apps (in-process store, or Redis with a prefix of their own), opens streams, and
    cleans up: streams closed, feeds stopped, Redis stores closed."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self.apps: list[tuple[Flask, SSERun]] = []
        self.streams: list[Stream] = []
        self.stores: list[RunStore] = []
        self._closed = False

    @property
    def redis_url(self) -> str:
        server: RedisServer = self._request.getfixturevalue("redis_server")
        return server.url

    def redis(self) -> redis.Redis:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        self._request.addfinalizer(client.close)
        return client

    def app(self, kind: str = "memory", **config: Any) -> tuple[Flask, SSERun]:
        app = Flask(f"channels-{len(self.apps)}")
        if kind == "redis":
            config.setdefault("SSE_RUN_REDIS_URL", self.redis_url)
            config.setdefault("SSE_RUN_REDIS_PREFIX", f"t-{uuid.uuid4().hex[:12]}:")
        app.config.update(config)
        sse = SSERun(app)
        self.apps.append((app, sse))
        return app, sse

    def open(self, app: Flask, path: str, **kwargs: Any) -> Stream:
        response = app.test_client().get(path, buffered=False, **kwargs)
        stream = Stream(response, lambda: self._wake(app))
        self.streams.append(stream)
        return stream

    def _wake(self, app: Flask) -> None:
        for name in list(hub(app).feeds):
            app.extensions[EXTENSION_KEY].extension.publish(name, "wake", app=app)

    def store(self, kind: str, **bounds: Any) -> RunStore:
        settings: dict[str, Any] = {"max_events": 100, "max_runs": 100, "ttl": 60.0, **bounds}
        made: RunStore
        if kind == "memory":
            made = MemoryRunStore(max_bytes=1 << 20, **settings)
        else:
            made = RedisRunStore(self.redis_url, prefix=f"t-{uuid.uuid4().hex[:12]}:", window=30, **settings)
        self.stores.append(made)
        return made

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in self.streams:
            stream.close()
        for app, _ in self.apps:
            channels = hub(app)
            deadline = time.monotonic() + WAIT
            while channels.feeds and time.monotonic() < deadline:
                time.sleep(0.02)
            self.stores.append(state(app).runs.store)
        for store in self.stores:
            if isinstance(store, RedisRunStore):
                store.close()


@pytest.fixture
def env(request: pytest.FixtureRequest, quick: None) -> Iterator[Env]:
    made = Env(request)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def state(app: Flask) -> State:
    found: State = app.extensions[EXTENSION_KEY]
    return found


def hub(app: Flask) -> Hub:
    return state(app).runs.channels


def run_key(app_or_prefix: Flask | str, name: str) -> str:
    prefix = app_or_prefix if isinstance(app_or_prefix, str) else app_or_prefix.config["SSE_RUN_REDIS_PREFIX"]
    return f"{prefix}run:{{{channel_run_id(name)}}}"


def subscribers(client: redis.Redis, app: Flask, name: str) -> int:
    """Subscriptions to the channel's run's announcements (sharded pub/sub, Redis 7)."""
    reply = client.execute_command("PUBSUB", "SHARDNUMSUB", f"{run_key(app, name)}:changed")
    return int(reply[1])


def sentinel_is_next(app: Flask, sse: SSERun, stream: Stream, channel: str) -> None:
    """Nothing is pending on ``stream``: an event published now is the next one it sends."""
    marker = f"sentinel-{uuid.uuid4().hex[:8]}"
    sse.publish(channel, marker, app=app)
    (block,) = stream.events(1)
    assert block.data == marker, block


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["news", "user:42", "import.7", "a", "A-Z_0.9:@x", "x" * MAX_NAME, "a:b:c", "@", "-"]
)
def test_valid_channel_names(name: str) -> None:
    assert is_channel_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "x" * (MAX_NAME + 1), "a b", "a/b", "a,b", "news\n", "é", "a?b", "a#b", "%41", None, 42, b"news"],
)
def test_invalid_channel_names(name: object) -> None:
    assert not is_channel_name(name)


def test_positions_round_trip_with_colons_in_names_and_keep_their_order() -> None:
    positions = {"user:42": 7, "news": 0, "a:b:c": 123456789012345678, "@:": 3}
    text = format_position(positions)
    assert text == "user:42:7,news:0,a:b:c:123456789012345678,@::3"
    parsed = parse_position(text)
    assert parsed == positions and list(parsed) == list(positions)
    assert parse_position("user:42:7") == {"user:42": 7}  # the seq is split off at the last ':'
    assert parse_position(" news:3 \r\n") == {"news": 3}


@pytest.mark.parametrize(
    "text",
    [
        "", "news", "news:", ":5", "news:01", "news:-1", "news:+1", "news:1.0", "news:x",
        "news:1234567890123456789", "news:1,news:2", "news:1,", ",news:1", "news:1;b:2",
        "a b:1", "news:1, b:2", f"{'x' * (MAX_NAME + 1)}:1", "news:1\nid: x:2",
    ],
)  # fmt: skip
def test_positions_that_are_not_ids_of_a_channel_stream(text: str) -> None:
    assert parse_position(text) is None


def test_a_channels_run_id_is_a_run_id_the_same_everywhere_and_its_own() -> None:
    run_id = channel_run_id("news")
    assert len(run_id) == 32 and int(run_id, 16) >= 0
    assert run_id == channel_run_id("news") != channel_run_id("News") != channel_run_id("news:1")


# -- the stores ----------------------------------------------------------------------------------


def test_open_channel_makes_it_once_and_gives_its_last_seq(env: Env, kind: str) -> None:
    store = env.store(kind)
    run_id = channel_run_id("news")
    assert store.get(run_id) is None
    assert store.open_channel(run_id) == 0
    assert store.open_channel(run_id) == 0
    info = store.get(run_id)
    assert info is not None and info.running and info.prefix == CHANNEL_PREFIX and info.function == ""
    assert info.owner is None and info.last_seq == 0
    assert store.publish(run_id, b"news:", b"data: a\n\n") == 1
    assert store.publish(run_id, b"news:", b"data: b\n\n") == 2
    assert store.open_channel(run_id) == 2  # opened again: nothing reset
    found = store.read(run_id, 0, 100)
    assert found is not None and found.missed == 0 and found.last_seq == 2 and not found.ended
    assert b"".join(data for _, data in found.events) == b"id: news:1\ndata: a\n\nid: news:2\ndata: b\n\n"
    # A first publish makes the channel too.
    assert store.publish(channel_run_id("other"), b"other:", b"data: c\n\n") == 1


def test_seqs_are_consecutive_and_unique_with_many_publishers_at_once(env: Env, kind: str) -> None:
    store = env.store(kind, channel_history=10_000)
    run_id = channel_run_id("busy")
    threads, per_thread = 8, 40
    seqs: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def publisher(index: int) -> None:
        start.wait(WAIT)
        for i in range(per_thread):
            seqs[index].append(store.publish(run_id, b"busy:", b"data: %d-%d\n\n" % (index, i)))

    workers = [threading.Thread(target=publisher, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT)
        assert not worker.is_alive()
    every = sorted(seq for each in seqs for seq in each)
    assert every == list(range(1, threads * per_thread + 1))  # no seq twice, none skipped
    for each in seqs:
        assert each == sorted(each)  # one publisher's events in its order
    found = store.read(run_id, 0, 10_000)
    assert found is not None and found.missed == 0
    stored = b"".join(data for _, data in found.events).decode().split("\n\n")[:-1]
    assert len(stored) == threads * per_thread
    by_data: dict[str, int] = {}
    for seq, block in enumerate(stored, 1):
        id_line, data_line = block.split("\n")
        assert id_line == f"id: busy:{seq}"
        by_data[data_line] = seq
    for index, each in enumerate(seqs):  # each publish's seq is that of its own event
        assert [by_data[f"data: {index}-{i}"] for i in range(per_thread)] == each


def test_a_channel_keeps_exactly_its_history(env: Env, kind: str) -> None:
    store = env.store(kind, channel_history=5)
    run_id = channel_run_id("news")
    for i in range(1, 13):
        assert store.publish(run_id, b"news:", b"data: %d\n\n" % i) == i
    found = store.read(run_id, 0, 100)
    assert found is not None and found.missed == 7 and found.last_seq == 12
    assert [seq for seq, _ in found.events] == [8, 9, 10, 11, 12]
    assert found.events[0][1] == b"id: news:8\ndata: 8\n\n"
    later = store.read(run_id, 9, 100)
    assert later is not None and later.missed == 0 and [seq for seq, _ in later.events] == [10, 11, 12]
    edge = store.read(run_id, 7, 100)
    assert edge is not None and edge.missed == 0 and len(edge.events) == 5


def test_an_idle_channel_is_forgotten_after_its_ttl_and_its_seqs_start_again(env: Env, kind: str) -> None:
    app, sse = env.app(kind, SSE_RUN_CHANNEL_HISTORY_TTL=1)
    store = state(app).runs.store
    assert sse.publish("news", "a", app=app) == "news:1"
    assert sse.publish("news", "b", app=app) == "news:2"
    assert store.get(channel_run_id("news")) is not None
    # In process the runtime's janitor forgets it; in Redis its keys expire.
    wait_for(lambda: store.get(channel_run_id("news")) is None, what="the channel to be forgotten")
    assert sse.publish("news", "c", app=app) == "news:1"
    found = store.read(channel_run_id("news"), 0, 10)
    assert found is not None and [seq for seq, _ in found.events] == [1]
    assert found.events[0][1] == b"id: news:1\ndata: c\n\n"


def test_redis_keys_of_a_channel_expire_and_it_has_no_lease(env: Env) -> None:
    app, sse = env.app("redis", SSE_RUN_CHANNEL_HISTORY_TTL=300)
    client = env.redis()
    sse.publish("news", "a", app=app)
    key = run_key(app, "news")
    assert 0 < client.ttl(key) <= 300 and 0 < client.ttl(f"{key}:events") <= 300
    assert not client.exists(f"{key}:lease")
    assert client.hget(key, "kind") == b"channel" and client.hget(key, "status") == b"running"
    assert client.hget(key, "prefix") == CHANNEL_PREFIX.encode()
    client.expire(key, 5)
    client.expire(f"{key}:events", 5)
    state(app).runs.store.open_channel(channel_run_id("news"))  # renewed
    assert client.ttl(key) > 5 and client.ttl(f"{key}:events") > 5


def test_redis_a_followed_silent_channel_is_neither_forgotten_nor_lost(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The feed's own wait as in production (longer than this channel's TTL): the renewal of a
    # followed channel must not wait on it. And another worker's watchdog, following the
    # channel's run as a plain run, finds no lease: it must not end it as lost.
    monkeypatch.setattr(hub_module, "FEED_WAIT", 2.5)
    app, sse = env.app("redis", SSE_RUN_CHANNEL_HISTORY_TTL=2)
    client = env.redis()
    sse.publish("news", "a", app=app)
    sse.publish("news", "b", app=app)
    stream = env.open(app, "/channels/news")
    assert stream.first() == "news:2"
    other = RedisRunStore(
        env.redis_url,
        prefix=app.config["SSE_RUN_REDIS_PREFIX"],
        max_events=10,
        max_runs=10,
        ttl=60,
        window=30,
    )
    env.stores.append(other)
    other.attach(channel_run_id("news"))  # not opened as a channel there: only Redis knows it is one
    try:
        time.sleep(5.5)  # silent: the watchdog looks at it every 1.5 s; the TTL is 2 s
        key = run_key(app, "news")
        assert client.hget(key, "status") == b"running" and client.hget(key, "last_seq") == b"2"
        assert client.ttl(key) > 0 and client.ttl(f"{key}:events") > 0
        info = other.get(channel_run_id("news"))
        assert info is not None and info.running
    finally:
        other.detach(channel_run_id("news"))
    assert sse.publish("news", "c", app=app) == "news:3"
    (block,) = stream.events(1)
    assert (block.id, block.data) == ("news:3", "c")


def test_a_channels_run_is_not_reachable_as_a_run(env: Env, kind: str) -> None:
    app, sse = env.app(kind, SSE_RUN_RESUMABLE=True)

    @sse.function
    def work() -> Iterator[str]:
        yield "done"

    sse.publish("news", "a", app=app)
    run_id = channel_run_id("news")
    client = app.test_client()
    assert client.get(f"/runs/{run_id}").status_code == 404
    assert client.get(f"/runs/{run_id}", headers={"Last-Event-ID": f"{run_id}:0"}).status_code == 404
    assert client.delete(f"/runs/{run_id}").status_code == 404
    # Nor through a function's URL with the channel's run in Last-Event-ID.
    resumed = client.post("/work", json={}, headers={"Last-Event-ID": f"{run_id}:0"})
    assert resumed.status_code == 204 and b"news" not in resumed.data
    info = state(app).runs.store.get(run_id)
    assert info is not None and info.running  # the DELETE ended nothing
    assert sse.publish("news", "b", app=app) == "news:2"


# -- refusals ------------------------------------------------------------------------------------


def error_of(response: TestResponse) -> str:
    assert response.mimetype == "application/json", response.data
    message = response.get_json()["error"]
    assert isinstance(message, str)
    return message


@pytest.mark.parametrize(
    ("path", "headers", "fragment"),
    [
        ("/channels/a%20b", {}, "the channel's name must be 1 to 200"),
        (f"/channels/{'x' * (MAX_NAME + 1)}", {}, "the channel's name must be"),
        ("/channels/%C3%A9", {}, "the channel's name must be"),
        ("/channels", {}, "name a channel"),
        ("/channels?channel=", {}, "the channel's name must be"),
        ("/channels?channel=a&channel=b%2Fc", {}, "channel #2's name must be"),
        ("/channels?channel=a&channel=b&channel=a", {}, "a channel is named twice"),
        (
            "/channels?" + "&".join(f"channel=c{i}" for i in range(MAX_CHANNELS + 1)),
            {},
            "at most 32 channels",
        ),
        ("/channels/a?channel=b", {}, "in the path or in ?channel=, not both"),
        ("/channels/a", {"Last-Event-ID": "garbage"}, "Last-Event-ID"),
        ("/channels/a", {"Last-Event-ID": "a:01"}, "Last-Event-ID"),
        ("/channels/a", {"Last-Event-ID": "a:1,a:2"}, "Last-Event-ID"),
        ("/channels/a", {"Last-Event-ID": "0123456789abcdef0123456789abcdef:-1"}, "Last-Event-ID"),
        ("/channels/a?last_event_id=a:x", {}, "Last-Event-ID"),
    ],
)
def test_bad_requests_are_400_json_before_any_stream(
    env: Env, path: str, headers: dict[str, str], fragment: str
) -> None:
    app, _ = env.app()
    response = app.test_client().get(path, headers=headers)
    assert response.status_code == 400
    assert fragment in error_of(response)
    assert "X-Request-ID" in response.headers
    assert not hub(app).feeds  # nothing followed


def test_32_channels_are_followed_in_one_stream(env: Env) -> None:
    app, sse = env.app()
    names = [f"c{i}" for i in range(MAX_CHANNELS)]
    stream = env.open(app, "/channels?" + "&".join(f"channel={name}" for name in names))
    assert stream.status_code == 200
    assert stream.first() == ",".join(f"{name}:0" for name in names)
    sse.publish("c31", "last", app=app)
    (block,) = stream.events(1)
    assert block.data == "last" and block.id == ",".join(f"{name}:{int(name == 'c31')}" for name in names)


@pytest.mark.parametrize("path", ["/channels/news", "/channels?channel=news"])
def test_other_methods_are_405_with_allow_and_options_is_204(env: Env, path: str) -> None:
    app, _ = env.app()
    client = app.test_client()
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD"):
        response = client.open(path, method=method)
        assert response.status_code == 405, method
        assert response.headers["Allow"] == "GET, OPTIONS"
        if method != "HEAD":
            assert "GET only" in error_of(response)
    options = client.options(path)
    assert options.status_code == 204 and "GET" in options.headers["Allow"]
    assert not hub(app).feeds


@pytest.mark.parametrize("accept", ["application/json", "image/png", "text/event-stream;q=0, */*;q=0"])
def test_a_client_that_takes_no_stream_is_406(env: Env, accept: str) -> None:
    app, _ = env.app()
    response = app.test_client().get("/channels/news", headers={"Accept": accept})
    assert response.status_code == 406
    error_of(response)
    assert not hub(app).feeds


def authorize(channel: str, subject: str | None) -> bool:
    if channel.startswith("public"):
        return True
    return subject is not None and channel == f"user:{subject}"


AUTH_ON = {"SSE_RUN_AUTH_TOKENS": [TOKEN], "SSE_RUN_JWT_KEY": SECRET}


@pytest.mark.parametrize(
    ("auth", "callback", "path", "token", "status"),
    [
        # Auth off, no callback: open.
        (False, False, "/channels/user:alice", None, 200),
        (False, False, "/channels?channel=news&channel=user:bob", None, 200),
        # Auth off, a callback: it decides, with no subject.
        (False, True, "/channels/public-news", None, 200),
        (False, True, "/channels/user:alice", None, 403),
        (False, True, "/channels/user:alice", "alice", 403),  # a token means nothing with auth off
        # Auth on, no callback: any authenticated caller.
        (True, False, "/channels/news", None, 401),
        (True, False, "/channels/news", "not-a-token-at-all", 401),
        (True, False, "/channels/news", TOKEN, 200),
        (True, False, "/channels/user:bob", "alice", 200),
        # Auth on, a callback: authenticated first, then it decides with the JWT's sub.
        (True, True, "/channels/public-news", None, 401),
        (True, True, "/channels/public-news", TOKEN, 200),
        (True, True, "/channels/user:alice", TOKEN, 403),  # a static token has no subject
        (True, True, "/channels/user:alice", "alice", 200),
        (True, True, "/channels/user:bob", "alice", 403),
        (True, True, "/channels?channel=public-a&channel=user:alice", "alice", 200),
        (True, True, "/channels?channel=public-a&channel=user:bob", "alice", 403),
    ],
)
def test_who_may_read_a_channel(
    env: Env, auth: bool, callback: bool, path: str, token: str | None, status: int
) -> None:
    app, sse = env.app(**(AUTH_ON if auth else {}))
    asked: list[tuple[str, str | None]] = []
    if callback:

        @sse.channel_auth
        def may_read(channel: str, subject: str | None) -> bool:
            asked.append((channel, subject))
            return authorize(channel, subject)

    headers = {}
    if token is not None:
        headers = bearer(token if token in (TOKEN, "not-a-token-at-all") else make_jwt(token))
    stream = env.open(app, path, headers=headers)
    assert stream.status_code == status, stream.response.data if status != 200 else ""
    if status == 200:
        stream.first()
        if callback:
            assert asked and all(
                subject == (token if auth and token != TOKEN else None) for _, subject in asked
            )
        return
    message = error_of(stream.response)
    if status == 401:
        assert "WWW-Authenticate" in stream.response.headers and not asked
    else:
        assert "not allowed to read" in message
        if "?" in path:
            assert "channel #2 of the request" in message
    assert not hub(app).feeds


def test_a_callback_on_one_instance_guards_the_channels_at_every_instances_urls(env: Env) -> None:
    # The channels are the app's: a second instance (here under /other, as the Falcon
    # blueprint's under /falcon) must not serve what the first one's callback refuses.
    app, sse = env.app()
    other = SSERun(url_prefix="/other")
    other.init_app(app)
    sse.channel_auth(authorize)
    for path in ("/channels/user:alice", "/other/channels/user:alice", "/other/channels?channel=user:bob"):
        response = app.test_client().get(path)
        assert response.status_code == 403, path
        assert "not allowed to read" in error_of(response)
    stream = env.open(app, "/other/channels/public-news")
    assert stream.status_code == 200
    stream.first()
    # With callbacks on both, each must allow the channel.
    other.channel_auth(lambda channel, subject: channel != "public-secret")
    assert app.test_client().get("/channels/public-secret").status_code == 403
    assert app.test_client().get("/other/channels/public-secret").status_code == 403


def test_a_redis_that_does_not_answer_is_503_json(env: Env) -> None:
    app, sse = env.app("redis", SSE_RUN_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    response = app.test_client().get("/channels/news")
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "unavailable" in error_of(response)
    multi = app.test_client().get("/channels?channel=a&channel=b")
    assert multi.status_code == 503
    assert not hub(app).feeds
    with pytest.raises(StoreUnavailable):
        sse.publish("news", "a", app=app)
    result = app.test_cli_runner().invoke(args=["sse", "publish", "news", "a"])
    assert result.exit_code == 1 and "unavailable" in result.output


# -- streams -------------------------------------------------------------------------------------


def test_a_stream_starts_with_its_position_then_sends_what_is_published(env: Env, kind: str) -> None:
    app, sse = env.app(kind)
    assert sse.publish("news", "before", app=app) == "news:1"
    stream = env.open(app, "/channels/news")
    assert stream.status_code == 200 and stream.response.mimetype == "text/event-stream"
    assert stream.response.headers["Cache-Control"] == "no-cache"
    assert stream.first() == "news:1"  # the newest: nothing replayed without Last-Event-ID
    assert sse.publish("news", "hello", app=app) == "news:2"
    assert sse.publish("news", {"n": 1, "ok": True}, event="update", app=app) == "news:3"
    assert sse.publish("news", "two\nlines", app=app) == "news:4"
    got = stream.events(3)
    assert [(b.id, b.event, b.data) for b in got] == [
        ("news:2", None, "hello"),
        ("news:3", "update", '{"n":1,"ok":true}'),
        ("news:4", None, "two\nlines"),
    ]
    sentinel_is_next(app, sse, stream, "news")


def test_a_first_stream_of_a_new_channel_starts_at_zero(env: Env, kind: str) -> None:
    app, sse = env.app(kind)
    stream = env.open(app, "/channels/user:42")
    assert stream.first() == "user:42:0"
    sse.publish("user:42", "hi", app=app)
    (block,) = stream.events(1)
    assert (block.id, block.data) == ("user:42:1", "hi")


@pytest.mark.parametrize("how", ["header", "query"])
def test_a_reconnect_replays_exactly_after_its_last_event_id(env: Env, kind: str, how: str) -> None:
    app, sse = env.app(kind)
    for i in range(1, 6):
        sse.publish("news", f"e{i}", app=app)
    if how == "header":
        stream = env.open(app, "/channels/news", headers={"Last-Event-ID": "news:2"})
    else:
        stream = env.open(app, "/channels/news?last_event_id=news:2")
    assert stream.first() == "news:2"
    got = stream.events(3)
    assert [(b.id, b.data) for b in got] == [("news:3", "e3"), ("news:4", "e4"), ("news:5", "e5")]
    sentinel_is_next(app, sse, stream, "news")
    # A second client while the feed runs: replayed from its cache or the store alike.
    again = env.open(app, "/channels/news", headers={"Last-Event-ID": "news:4"})
    assert again.first() == "news:4"
    assert [b.data for b in again.events(2)] == ["e5", stream.blocks[-1].data]


def test_a_position_of_another_channel_is_ignored(env: Env, kind: str) -> None:
    app, sse = env.app(kind)
    sse.publish("news", "a", app=app)
    stream = env.open(app, "/channels/news", headers={"Last-Event-ID": "sport:5"})
    assert stream.first() == "news:1"
    sentinel_is_next(app, sse, stream, "news")


def test_a_position_beyond_the_channel_is_a_channel_that_started_again(env: Env, kind: str) -> None:
    app, sse = env.app(kind)
    sse.publish("news", "new-1", app=app)
    sse.publish("news", "new-2", app=app)
    stream = env.open(app, "/channels/news", headers={"Last-Event-ID": "news:40"})
    assert stream.first() == "news:0"
    assert [(b.id, b.data) for b in stream.events(2)] == [("news:1", "new-1"), ("news:2", "new-2")]
    sentinel_is_next(app, sse, stream, "news")


def test_an_old_position_is_told_how_many_events_it_missed(env: Env, kind: str) -> None:
    app, sse = env.app(kind, SSE_RUN_CHANNEL_HISTORY=3)
    for i in range(1, 11):
        sse.publish("news", f"e{i}", app=app)
    stream = env.open(app, "/channels/news", headers={"Last-Event-ID": "news:2"})
    assert stream.first() == "news:2"
    missed, *rest = stream.events(4)
    assert (missed.event, missed.id, missed.json()) == ("missed", "news:7", {"channel": "news", "missed": 5})
    assert [(b.id, b.data) for b in rest] == [("news:8", "e8"), ("news:9", "e9"), ("news:10", "e10")]
    sentinel_is_next(app, sse, stream, "news")


def test_a_slow_client_is_told_what_it_missed_rather_than_held_for(
    env: Env, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "CACHE_EVENTS", 4)
    app, sse = env.app(kind, SSE_RUN_CHANNEL_HISTORY=6)
    slow = env.open(app, "/channels/news")
    fast = env.open(app, "/channels/news")
    assert slow.first() == fast.first() == "news:0"
    for i in range(1, 21):
        sse.publish("news", f"e{i}", app=app)
        assert fast.events(1)[0].data == f"e{i}"  # a reader that keeps up misses nothing
    feed = hub(app).feeds["news"]
    assert len(feed.events) <= 4  # the worker holds the cache's events, not the slow client's
    # The slow one stopped reading after its first block: what it gets now.
    missed, *rest = slow.events(7)
    assert missed.event == "missed" and missed.json() == {"channel": "news", "missed": 14}
    assert missed.id == "news:14"
    assert [b.data for b in rest] == [f"e{i}" for i in range(15, 21)]
    sentinel_is_next(app, sse, slow, "news")


def test_several_channels_resume_exactly_with_the_composite_id(env: Env, kind: str) -> None:
    app, sse = env.app(kind)
    names = ["a", "b:c", "user:7"]
    path = "/channels?" + "&".join(f"channel={name}" for name in names)
    published: dict[str, list[str]] = {name: [] for name in names}
    order = ["a", "b:c", "a", "user:7", "b:c", "b:c", "a", "user:7", "a", "b:c", "user:7", "a"]

    def publish_round(tag: str) -> None:
        for i, name in enumerate(order):
            data = f"{name}/{tag}{i}"
            eid = sse.publish(name, data, app=app)
            published[name].append(data)
            assert eid == f"{name}:{len(published[name])}"

    stream = env.open(app, path)
    assert stream.first() == "a:0,b:c:0,user:7:0"
    publish_round("x")
    seen: dict[str, list[str]] = {name: [] for name in names}

    def record(blocks: list[Block]) -> None:
        for block in blocks:
            assert block.data is not None and block.id is not None
            name = block.data.split("/")[0]
            seen[name].append(block.data)
            position = parse_position(block.id)
            assert position is not None and list(position) == names  # in the request's order
            for each in names:  # the id says how far every channel was read
                assert position[each] == len(seen[each])

    first_part = stream.events(5)
    record(first_part)
    last_id = first_part[-1].id
    assert last_id is not None
    stream.close()  # the client goes; the rest of what it may have read never reached it
    publish_round("y")
    resumed = env.open(app, path, headers={"Last-Event-ID": last_id})
    assert resumed.first() == last_id
    record(resumed.events(2 * len(order) - 5))
    for name in names:  # every event once, each channel's in order
        assert seen[name] == published[name]
    sentinel_is_next(app, sse, resumed, "user:7")


def test_the_composite_id_names_only_the_channels_read_and_a_partial_position_starts_others_new(
    env: Env, kind: str
) -> None:
    app, sse = env.app(kind)
    for i in range(3):
        sse.publish("a", f"a{i + 1}", app=app)
        sse.publish("b", f"b{i + 1}", app=app)
    stream = env.open(app, "/channels?channel=b&channel=a", headers={"Last-Event-ID": "a:1"})
    assert stream.first() == "b:3,a:1"
    got = stream.events(2)
    assert [(x.id, x.data) for x in got] == [("b:3,a:2", "a2"), ("b:3,a:3", "a3")]
    sse.publish("b", "b4", app=app)
    (block,) = stream.events(1)
    assert (block.id, block.data) == ("b:4,a:3", "b4")


def test_many_clients_of_a_channel_share_one_feed_and_get_every_event(env: Env, kind: str) -> None:
    app, sse = env.app(kind)
    streams = [env.open(app, "/channels/news") for _ in range(10)]
    for stream in streams:
        assert stream.first() == "news:0"
    assert list(hub(app).feeds) == ["news"] and hub(app).feeds["news"].clients == 10
    if kind == "redis":
        client = env.redis()
        wait_for(lambda: subscribers(client, app, "news") == 1, what="one subscription")
        assert client.hget(run_key(app, "news"), "clients") == b"1"  # one follower: the feed
    for i in range(3):
        sse.publish("news", f"e{i}", app=app)
    for stream in streams:
        assert [b.data for b in stream.events(3)] == ["e0", "e1", "e2"]
    if kind == "redis":
        assert subscribers(client, app, "news") == 1


def test_another_worker_publishes_and_this_one_streams(env: Env) -> None:
    # Two apps on one Redis (one prefix): two workers, or a job in another process.
    reader, _ = env.app("redis")
    writer, writer_sse = env.app("redis", SSE_RUN_REDIS_PREFIX=reader.config["SSE_RUN_REDIS_PREFIX"])
    writer_sse.publish("news", "old", app=writer)
    stream = env.open(reader, "/channels/news", headers={"Last-Event-ID": "news:0"})
    assert stream.first() == "news:0"
    assert stream.events(1)[0].data == "old"
    for i in range(5):
        assert writer_sse.publish("news", f"e{i}", app=writer) == f"news:{i + 2}"
    assert [(b.id, b.data) for b in stream.events(5)] == [(f"news:{i + 2}", f"e{i}") for i in range(5)]
    result = writer.test_cli_runner().invoke(args=["sse", "publish", "news", "from the shell"])
    assert result.exit_code == 0 and result.output == "news:7\n"
    (block,) = stream.events(1)
    assert (block.id, block.data) == ("news:7", "from the shell")


# -- the feed: lingering, subscriptions, restarts, failures ---------------------------------------


def test_redis_a_feed_lingers_after_its_last_client_then_unsubscribes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "LINGER", 1.5)
    app, sse = env.app("redis")
    client = env.redis()
    stream = env.open(app, "/channels/news")
    assert stream.first() == "news:0"
    wait_for(lambda: subscribers(client, app, "news") == 1, what="the subscription")
    feed = hub(app).feeds["news"]
    stream.close()
    assert feed.clients == 0
    # Within LINGER: still followed, and a client that comes back finds the same feed.
    assert subscribers(client, app, "news") == 1 and hub(app).feeds.get("news") is feed
    back = env.open(app, "/channels/news")
    assert back.first() == "news:0" and hub(app).feeds.get("news") is feed and feed.clients == 1
    sse.publish("news", "still here", app=app)
    assert back.events(1)[0].data == "still here"
    back.close()
    wait_for(lambda: "news" not in hub(app).feeds, what="the feed to stop")
    wait_for(lambda: subscribers(client, app, "news") == 0, what="the unsubscription")
    wait_for(lambda: client.hget(run_key(app, "news"), "clients") == b"0", what="no follower")
    # The next client makes a new feed, subscribed again.
    third = env.open(app, "/channels/news")
    assert third.first() == "news:1" and hub(app).feeds["news"] is not feed
    wait_for(lambda: subscribers(client, app, "news") == 1, what="a new subscription")


def test_a_feed_stops_after_its_last_client(env: Env, kind: str) -> None:
    app, _ = env.app(kind)
    streams = [env.open(app, "/channels?channel=a&channel=b") for _ in range(2)]
    for stream in streams:
        stream.first()
    assert sorted(hub(app).feeds) == ["a", "b"]
    streams[0].close()
    assert {name: feed.clients for name, feed in hub(app).feeds.items()} == {"a": 1, "b": 1}
    streams[1].close()
    wait_for(lambda: not hub(app).feeds, what="the feeds to stop")

    def let_go() -> bool:
        info = state(app).runs.store.get(channel_run_id("a"))
        assert info is not None and info.running
        return info.clients == 0 and info.idle_since is not None

    wait_for(let_go, what="the channel's run to have no follower")


def test_a_stream_closed_unread_lets_go_of_its_feeds(env: Env, kind: str) -> None:
    app, _ = env.app(kind)
    response = app.test_client().get("/channels?channel=a&channel=b", buffered=False)
    assert response.status_code == 200
    assert {name: feed.clients for name, feed in hub(app).feeds.items()} == {"a": 1, "b": 1}
    response.close()
    wait_for(lambda: not hub(app).feeds, what="the feeds to stop")


def test_a_channel_stream_that_never_started_lets_go_of_its_feeds_when_closed(env: Env, kind: str) -> None:
    store = env.store(kind)
    channels = Hub(store)
    feeds = [channels.join("a"), channels.join("b")]
    body = ChannelStream(channels, feeds, {"a": 0, "b": 0})
    assert [feed.clients for feed in feeds] == [1, 1]
    body.close()
    body.close()  # once only
    assert [feed.clients for feed in feeds] == [0, 0]
    wait_for(lambda: not channels.feeds, what="the feeds to stop")


def test_redis_a_stream_made_before_its_channel_started_again_reads_it_from_its_start(env: Env) -> None:
    # The server may start reading the body after the feed learnt of the restart: the position
    # the stream was given is of the old channel all the same.
    store = env.store("redis", channel_ttl=3)
    assert isinstance(store, RedisRunStore)
    channels = Hub(store)
    run_id = channel_run_id("news")
    for i in range(3):
        store.publish(run_id, b"news:", b"data: old%d\n\n" % i)
    feed = channels.join("news")
    body = ChannelStream(channels, [feed], {"news": 3})
    client = env.redis()
    key = f"{store.prefix}run:{{{run_id}}}"
    client.delete(key, f"{key}:events")
    assert store.publish(run_id, b"news:", b"data: new\n\n") == 1
    wait_for(lambda: feed.epoch >= 1, what="the feed to start again")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend([next(body).data, next(body).data]), daemon=True)
    reader.start()
    reader.join(WAIT)
    stuck = reader.is_alive()
    if stuck:  # waiting past the old channel's position: unblock it before failing
        for _ in range(4):
            store.publish(run_id, b"news:", b"data: wake\n\n")
        reader.join(WAIT)
    if not reader.is_alive():
        body.close()
    assert not stuck and got == [b"id: news:3\n\n", b"id: news:1\ndata: new\n\n"], got
    wait_for(lambda: not channels.feeds, what="the feed to stop")


def test_redis_a_channel_that_starts_again_under_its_followers_is_read_from_its_start(env: Env) -> None:
    # Its keys gone (expired, or deleted) and made again by a publish: the feed learns it at its
    # next renewal (a third of the TTL), and every client starts the channel over.
    app, sse = env.app("redis", SSE_RUN_CHANNEL_HISTORY_TTL=3)
    client = env.redis()
    for i in range(3):
        sse.publish("news", f"old{i}", app=app)
    reading = env.open(app, "/channels/news")
    assert reading.first() == "news:3"
    waiting = env.open(app, "/channels/news")  # its position taken, not read yet
    feed = hub(app).feeds["news"]
    key = run_key(app, "news")
    client.delete(key, f"{key}:events")
    assert sse.publish("news", "new", app=app) == "news:1"
    (block,) = reading.events(1)
    assert (block.id, block.data) == ("news:1", "new")
    wait_for(lambda: feed.epoch >= 1, what="the feed to start again")
    # The one that had not read yet started at news:3 of the old channel: the new one's from 1.
    assert waiting.first() == "news:3"
    (block,) = waiting.events(1)
    assert (block.id, block.data) == ("news:1", "new")
    sse.publish("news", "next", app=app)
    assert reading.events(1)[0].id == waiting.events(1)[0].id == "news:2"


def test_a_store_that_stays_away_ends_the_streams_with_an_error_and_the_next_client_starts_again(
    env: Env, tmp_path: Any
) -> None:
    servers = [RedisServer(tmp_path).start()]
    try:
        app, sse = env.app("redis", SSE_RUN_REDIS_URL=servers[0].url, SSE_RUN_STORE_OUTAGE=0.5)
        stream = env.open(app, "/channels/news")
        assert stream.first() == "news:0"
        sse.publish("news", "a", app=app)
        assert stream.events(1)[0].data == "a"
        servers[0].stop()
        (error,) = stream.rest()
        assert error.event == "error" and error.json()["type"] == "StoreUnavailable"
        wait_for(lambda: "news" not in hub(app).feeds, what="the failed feed to go")
        assert app.test_client().get("/channels/news").status_code == 503
        servers.append(RedisServer(tmp_path, port=servers[0].port).start())  # back, empty
        again = env.open(app, "/channels/news")
        assert again.status_code == 200 and again.first() == "news:0"
        assert sse.publish("news", "b", app=app) == "news:1"
        assert again.events(1)[0].data == "b"
    finally:
        env.close()  # before the server goes: the feeds stop, the store closes
        for server in servers:
            server.stop()


def test_a_full_in_process_store_refuses_a_new_channel_and_then_takes_it(env: Env) -> None:
    app, sse = env.app(SSE_RUN_MAX_RUNS=1, SSE_RUN_CHANNEL_HISTORY_TTL=0.5, SSE_RUN_STORE_OUTAGE=1)
    sse.publish("a", "x", app=app)  # the only run the store holds
    refused = app.test_client().get("/channels/b")
    assert refused.status_code == 503 and "holds 1 runs" in error_of(refused)
    both = app.test_client().get("/channels?channel=a&channel=b")
    assert both.status_code == 503
    assert not hub(app).feeds or all(feed.clients == 0 for feed in hub(app).feeds.values())
    wait_for(lambda: not hub(app).feeds, what="channel a's feed to stop")
    store = state(app).runs.store
    assert isinstance(store, MemoryRunStore)
    wait_for(lambda: len(store) == 0, what="channel a to be forgotten")
    stream = env.open(app, "/channels/b")
    assert stream.status_code == 200 and stream.first() == "b:0"


# -- publishing ----------------------------------------------------------------------------------


def test_publish_refuses_what_it_cannot_send(env: Env, kind: str) -> None:
    app, sse = env.app(kind, SSE_RUN_RESUME_MAX_BYTES=1000)
    for bad in ("", "a b", "x" * (MAX_NAME + 1), "a,b"):
        with pytest.raises(ValueError, match="channel's name"):
            sse.publish(bad, "data", app=app)
    with pytest.raises(ValueError, match="None"):
        sse.publish("news", None, app=app)
    with pytest.raises(ValueError, match="SSE_RUN_RESUME_MAX_BYTES"):
        sse.publish("news", "x" * 1000, app=app)
    with pytest.raises(ValueError):
        sse.publish("news", "data", event="two\nlines", app=app)
    with pytest.raises(TypeError):
        sse.publish("news", object(), app=app)
    with pytest.raises(RuntimeError):  # no app: no application context, none given
        sse.publish("news", "data")
    with pytest.raises(RuntimeError, match="not set up"):
        sse.publish("news", "data", app=Flask("bare"))
    assert state(app).runs.store.get(channel_run_id("news")) is None  # nothing was published
    with app.app_context():
        assert sse.publish("news", "x" * 900) == "news:1"  # in the app's context, within the bound
        assert sse.publish("news", "", event="ping") == "news:2"  # an empty string is sent


def test_redis_publishing_leaves_the_runtime_janitor_to_the_runs(env: Env) -> None:
    # The janitor beats the hearts of the runs this process produces: a run whose producer is
    # silent keeps its lease (LEASE_MS, 2 s) only through it. A publish must not leave it stopped.
    app, sse = env.app("redis")
    client = env.redis()
    gate = threading.Event()

    @sse.function(resumable=True)
    def slow() -> Iterator[str]:
        yield "start"
        gate.wait(WAIT)
        yield "end"

    try:
        for i in range(5):
            sse.publish("news", f"e{i}", app=app)
        started = app.test_client().post("/slow", json={}, headers={"Prefer": "respond-async"})
        assert started.status_code == 202
        run_id = started.headers["X-Run-ID"]
        time.sleep(2.6)  # silent for longer than its lease
        key = f"{app.config['SSE_RUN_REDIS_PREFIX']}run:{{{run_id}}}"
        assert client.hget(key, "status") == b"running"
        assert client.exists(f"{key}:lease"), "the run's lease was not renewed"
    finally:
        gate.set()
    done = app.test_client().get(f"/runs/{run_id}", headers={"Last-Event-ID": f"{run_id}:0"})
    assert b"data: start" in done.data and b"data: end" in done.data


def test_a_generator_publishes_progress_to_a_channel_as_it_runs(env: Env, kind: str) -> None:
    app, sse = env.app(kind)

    @sse.function
    def job(n: int) -> Iterator[str]:
        for i in range(n):
            sse.publish("job:progress", {"step": i, "of": n}, event="progress")
            yield f"step {i}"

    @sse.function(resumable=True)
    def resumable_job(n: int) -> Iterator[str]:
        for i in range(n):
            sse.publish("job:progress", {"step": i, "of": n, "run": True}, event="progress")
            yield f"step {i}"

    watcher = env.open(app, "/channels/job:progress")
    assert watcher.first() == "job:progress:0"
    plain = app.test_client().post("/job", json={"n": 3})
    assert plain.status_code == 200 and plain.data.count(b"data: step") == 3
    got = watcher.events(3)
    assert [(b.event, b.id, b.json()) for b in got] == [
        ("progress", f"job:progress:{i + 1}", {"step": i, "of": 3}) for i in range(3)
    ]
    run = app.test_client().post("/resumable_job", json={"n": 2})
    assert run.status_code == 200 and "X-Run-ID" in run.headers and run.data.count(b"data: step") == 2
    got = watcher.events(2)
    assert [(b.id, b.json()) for b in got] == [
        (f"job:progress:{i + 4}", {"step": i, "of": 2, "run": True}) for i in range(2)
    ]


def test_the_resumable_setting_does_not_touch_channels(env: Env, kind: str) -> None:
    app, sse = env.app(kind, SSE_RUN_RESUMABLE=True)

    @sse.function
    def job() -> Iterator[str]:
        sse.publish("progress", "half")
        yield "done"

    watcher = env.open(app, "/channels/progress")
    assert watcher.first() == "progress:0" and "X-Run-ID" not in watcher.response.headers
    response = app.test_client().post("/job", json={})
    assert response.status_code == 200 and "X-Run-ID" in response.headers
    (block,) = watcher.events(1)
    assert (block.id, block.event, block.data) == ("progress:1", None, "half")
    sentinel_is_next(app, sse, watcher, "progress")


def test_the_cli_refuses_to_publish_in_process(env: Env) -> None:
    app, _ = env.app()
    result = app.test_cli_runner().invoke(args=["sse", "publish", "news", "hello"])
    assert result.exit_code == 1
    assert "SSE_RUN_REDIS_URL" in result.output
    assert state(app).runs.store.get(channel_run_id("news")) is None


def test_the_cli_publishes_on_redis(env: Env) -> None:
    app, _ = env.app("redis")
    stream = env.open(app, "/channels/news")
    assert stream.first() == "news:0"
    runner = app.test_cli_runner()
    result = runner.invoke(args=["sse", "publish", "news", "hello world"])
    assert (result.exit_code, result.output) == (0, "news:1\n")
    result = runner.invoke(args=["sse", "publish", "news", '{"a": [1, 2],  "b": null}', "--json"])
    assert (result.exit_code, result.output) == (0, "news:2\n")
    result = runner.invoke(args=["sse", "publish", "news", "42", "--event", "count"])
    assert (result.exit_code, result.output) == (0, "news:3\n")
    result = runner.invoke(args=["sse", "publish", "news", '"text"', "--json", "--event", "quoted"])
    assert (result.exit_code, result.output) == (0, "news:4\n")
    got = stream.events(4)
    assert [(b.id, b.event, b.data) for b in got] == [
        ("news:1", None, "hello world"),
        ("news:2", None, '{"a":[1,2],"b":null}'),  # its compact encoding
        ("news:3", "count", "42"),  # without --json, the text as it is
        ("news:4", "quoted", "text"),
    ]
    for args, fragment in [
        (["sse", "publish", "news", "{not json", "--json"], "DATA is not JSON"),
        (["sse", "publish", "bad name", "x"], "channel's name"),
        (["sse", "publish", "news", "x", "--event", "a\nb"], "line break"),
    ]:
        result = runner.invoke(args=args)
        assert result.exit_code == 1 and fragment in result.output, result.output
    sentinel_is_next(app, app.extensions[EXTENSION_KEY].extension, stream, "news")


def test_channels_are_served_below_the_url_prefix(env: Env) -> None:
    app = Flask("prefixed")
    sse = SSERun(app, url_prefix="/api")
    env.apps.append((app, sse))
    assert app.test_client().get("/channels/news").status_code == 404
    stream = env.open(app, "/api/channels/news")
    assert stream.status_code == 200 and stream.first() == "news:0"
    sse.publish("news", "hi", app=app)
    assert stream.events(1)[0].data == "hi"
    multi = env.open(app, "/api/channels?channel=news&channel=b")
    assert multi.first() == "news:1,b:0"
    assert app.test_client().post("/api/channels/news").status_code == 405


@pytest.mark.parametrize(
    "config",
    [
        {"SSE_RUN_CHANNEL_HISTORY": 0},
        {"SSE_RUN_CHANNEL_HISTORY": -1},
        {"SSE_RUN_CHANNEL_HISTORY_TTL": 0},
        {"SSE_RUN_CHANNEL_HISTORY_TTL": "soon"},
    ],
)
def test_bad_channel_settings_fail_at_start_up(config: dict[str, Any]) -> None:
    app = Flask("bad")
    app.config.update(config)
    with pytest.raises(ConfigurationError, match="SSE_RUN_CHANNEL_HISTORY"):
        SSERun(app)


# -- metrics, registration -----------------------------------------------------------------------


def test_metrics_count_publishes_and_followed_channels(env: Env, kind: str) -> None:
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    app, sse = env.app(kind, SSE_RUN_METRICS=True)
    before = value("sse_run_channel_published_total")
    sse.publish("news", "a", app=app)
    sse.publish("sport", "b", app=app)
    assert value("sse_run_channel_published_total") == before + 2
    with pytest.raises(ValueError):
        sse.publish("bad name", "c", app=app)
    assert value("sse_run_channel_published_total") == before + 2  # a refused one is not counted
    stream = env.open(app, "/channels?channel=news&channel=sport")
    stream.first()
    assert value("sse_run_channel_feeds") == 2
    other = env.open(app, "/channels/news")
    other.first()
    assert value("sse_run_channel_feeds") == 2  # one feed per channel, however many clients
    page = app.test_client().get("/metrics").get_data(as_text=True)
    assert "sse_run_channel_published_total" in page and "sse_run_channel_feeds 2.0" in page
    stream.close()
    other.close()
    wait_for(lambda: value("sse_run_channel_feeds") == 0, what="the feeds gauge to fall")


@pytest.mark.parametrize("how", ["name", "function"])
def test_channels_is_no_functions_name(how: str) -> None:
    sse = SSERun()
    with pytest.raises(RegistrationError, match="channels"):
        if how == "name":

            @sse.function(name="channels")
            def anything() -> Iterator[str]:
                yield "x"

        else:

            @sse.function
            def channels() -> Iterator[str]:
                yield "x"

    assert sse.functions == {}


class CountingStore(MemoryRunStore):
    """The in-process store, counting its reads and, when told, failing them."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(max_events=100, max_bytes=1 << 20, max_runs=100, ttl=60.0, **settings)
        self.reads: list[int] = []  # the positions read after
        self.fail_with: BaseException | None = None
        self.slow = 0.0

    def read(self, run_id: str, after: int, limit: int) -> Any:
        self.reads.append(after)
        if self.fail_with is not None:
            raise self.fail_with
        time.sleep(self.slow)  # a round trip's length: clients behind meet during it
        return super().read(run_id, after, limit)


def test_clients_behind_the_cache_share_one_store_read_and_one_copy(quick: None) -> None:
    # After a burst, thousands of clients stand at the same position behind the feed's cache:
    # one store read for all of them (each read its own, and a burst at 10,000 subscribers
    # stalled them for 33 s while the worker grew to 5 GiB), and one joined copy of the events.
    store = CountingStore(channel_history=500)
    channels = Hub(store)
    run_id = channel_run_id("news")
    feed = channels.join("news")
    try:
        for i in range(300):
            store.publish(run_id, b"news:", b"data: %d\n\n" % i)
        wait_for(lambda: feed.last_seq == 300, what="the feed to read the burst")
        feed._clear()  # the cache no longer reaches back (as after a gap)
        assert feed.after(10) is None
        store.reads, store.slow = [], 0.2
        found: list[Any] = []
        readers = [threading.Thread(target=lambda: found.append(feed.read(10))) for _ in range(20)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(WAIT)
        assert len(found) == 20 and store.reads.count(10) == 1
        assert all(each is found[0] for each in found)
        assert feed.read(10) is found[0] and store.reads.count(10) == 1  # kept for the ones just after
        events = list(found[0].events)
        assert events[0][0] == 11 and events[-1][0] == 300
        first, again = feed.joined(events), feed.joined(list(events))
        assert first is again and first.startswith(b"id: news:11\ndata: 10\n\n")
    finally:
        channels.leave(feed)
        wait_for(lambda: not channels.feeds, what="the feed to stop")


def test_a_feed_that_stops_on_an_unexpected_error_tells_its_clients(
    quick: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The follower's thread ends with the error (its traceback is the bug's report): caught here,
    # and waited for, so that it is not reported against whichever test runs next.
    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    store = CountingStore()
    channels = Hub(store)
    feed = channels.join("news")
    body = ChannelStream(channels, [feed], {"news": 0})
    try:
        assert next(body).data == b"id: news:0\n\n"
        store.fail_with = RuntimeError("a bug")
        store.publish(channel_run_id("news"), b"news:", b"data: x\n\n")  # wakes the feed to read
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(next(body).data), daemon=True)
        reader.start()
        reader.join(WAIT)
        assert got and b"event: error" in got[0] and b'"type":"FeedStopped"' in got[0], got
        assert b"feed stopped (RuntimeError)" in got[0]
        assert "news" not in channels.feeds  # the next client makes a new feed
        wait_for(lambda: raised, what="the follower's thread to end with the error")
        assert [type(exc) for exc in raised] == [RuntimeError]
    finally:
        body.close()


def test_channels_on_a_redis_cluster_spread_over_its_nodes_and_resume(
    env: Env, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A channel is a run: its keys and announcements share its hash tag, so each lives on one
    # primary, and a worker follows it through the listener of that node.
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        app, sse = env.app(
            SSE_RUN_REDIS_URL=cluster.url,
            SSE_RUN_REDIS_CLUSTER=True,
            SSE_RUN_REDIS_PREFIX=f"t-{uuid.uuid4().hex[:12]}:",
        )
        names = [f"c{i}" for i in range(8)]
        stream = env.open(app, "/channels?" + "&".join(f"channel={name}" for name in names))
        assert stream.first() == ",".join(f"{name}:0" for name in names)
        for name in names:
            assert sse.publish(name, f"to {name}", app=app) == f"{name}:1"
            (block,) = stream.events(1)
            assert block.data == f"to {name}"
        store = state(app).runs.store
        assert isinstance(store, RedisRunStore)
        owners = {
            store._redis.get_node_from_key(f"{store.prefix}run:{{{channel_run_id(name)}}}").name
            for name in names
        }
        assert len(owners) >= 2  # spread over the primaries
        resumed = env.open(app, "/channels/c3", headers={"Last-Event-ID": "c3:0"})
        assert resumed.first() == "c3:0"
        assert [block.data for block in resumed.events(1)] == ["to c3"]
        stream.close()
        resumed.close()
        wait_for(lambda: not hub(app).feeds, what="the feeds to stop")
