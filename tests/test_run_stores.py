"""The run stores on their own, each against the same contract: in-process, and Redis (a real
redis-server). The runtime drives them from greenlets; these tests from threads."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_sse_run.runs.memory import MemoryRunStore
from flask_sse_run.runs.store import RunStore, StoreFull, StoreUnavailable
from tests.redis_server import RedisCluster, RedisServer

RUN = "a" * 32
Make = Callable[..., RunStore]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as made:
        yield made


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make(request: pytest.FixtureRequest) -> Iterator[Make]:
    made: list[RunStore] = []

    def factory(**bounds: Any) -> RunStore:
        settings = {"max_events": 100, "max_bytes": 1 << 20, "max_runs": 10, "ttl": 60.0, **bounds}
        store: RunStore
        if request.param == "memory":
            store = MemoryRunStore(**settings)
        else:
            from flask_sse_run.runs.redis_store import RedisRunStore

            on_cluster = request.param == "redis-cluster"
            url = (
                request.getfixturevalue("cluster").url if on_cluster else request.getfixturevalue("redis_url")
            )
            store = RedisRunStore(
                url, prefix=f"test-{uuid.uuid4().hex}:", window=30, cluster=on_cluster, **settings
            )
        made.append(store)
        store.create(RUN, "run", "/p", "alice")
        return store

    yield factory
    for store in made:
        store.close()


def events(first: int, last: int, size: int = 10) -> list[tuple[int, bytes]]:
    return [(seq, b"x%d" % seq + b"x" * size) for seq in range(first, last + 1)]


def read_bytes(store: RunStore, after: int, limit: int = 1000) -> tuple[bytes, int]:
    """What a read after ``after`` gives: its chunks' bytes joined, and the last seq read
    (``after`` if none); the chunks come in order."""
    found = store.read(RUN, after, limit)
    assert found is not None
    chunk_seqs = [seq for seq, _ in found.events]
    assert chunk_seqs == sorted(set(chunk_seqs)) and all(seq > after for seq in chunk_seqs)
    return b"".join(data for _, data in found.events), (chunk_seqs[-1] if chunk_seqs else after)


def joined(first: int, last: int) -> bytes:
    return b"".join(data for _, data in events(first, last))


def test_a_new_run_is_running_idle_and_knows_its_function_and_owner(make: Make) -> None:
    store = make()
    info = store.get(RUN)
    assert info is not None
    assert (info.function, info.prefix, info.owner, info.status) == ("run", "/p", "alice", "running")
    assert info.running and info.last_seq == 0 and info.clients == 0 and info.idle_since is not None
    assert store.get("b" * 32) is None and store.read("b" * 32, 0, 10) is None


def test_reads_what_was_appended_after_a_position_in_order_and_within_a_limit(make: Make) -> None:
    store = make()
    store.append(RUN, events(1, 3))
    store.append(RUN, events(4, 5))
    # A position inside a batch the store keeps whole is exact all the same.
    for after in range(6):
        assert read_bytes(store, after) == (joined(after + 1, 5), 5)
    found = store.read(RUN, 2, 100)
    assert found is not None and found.missed == 0 and found.last_seq == 5 and not found.ended
    limited = store.read(RUN, 0, 1)
    assert limited is not None and len(limited.events) == 1  # one chunk: an event, or a batch
    info = store.get(RUN)
    assert info is not None and info.last_seq == 5


def test_the_oldest_events_go_beyond_max_events_and_a_reader_learns_how_many_it_missed(make: Make) -> None:
    store = make(max_events=3)
    for seq in range(1, 201):  # one at a time: Redis trims approximately, per append
        store.append(RUN, events(seq, seq))
    found = store.read(RUN, 2, 1000)
    assert found is not None and found.events and found.missed > 0
    first_held = 2 + found.missed + 1  # exactly the ones between the position and what is held
    assert read_bytes(store, 2) == (joined(first_held, 200), 200)  # the newest kept, in order
    assert first_held > 100


@pytest.mark.parametrize("batch", [1, 3])
def test_the_oldest_events_go_beyond_max_bytes_and_a_reader_learns_how_many_it_missed(
    make: Make, batch: int
) -> None:
    # The Redis store keeps (and drops) a batch whole: in batches of 3, what is held starts
    # at a batch's first event.
    store = make(max_bytes=100)
    for first in range(1, 61, batch):
        store.append(RUN, events(first, first + batch - 1))  # 13 bytes each
    found = store.read(RUN, 0, 1000)
    assert found is not None and found.events and found.missed > 0
    first_held = found.missed + 1
    assert read_bytes(store, 0) == (joined(first_held, 60), 60)  # the newest kept, in order
    assert 100 - 13 * batch < len(joined(first_held, 60)) <= 100
    # A reader further on misses only what was dropped after its position.
    later = store.read(RUN, first_held - 3, 1000)
    assert later is not None and later.missed == 2
    # The newest is always kept, even alone over the bound.
    store.append(RUN, [(61, b"y" * 500)])
    found = store.read(RUN, 0, 1000)
    assert found is not None and found.missed == 60 and read_bytes(store, 0) == (b"y" * 500, 61)
    store.append(RUN, events(62, 62))
    assert read_bytes(store, 0) == (joined(62, 62), 62)


def test_an_ended_run_reads_to_its_end_and_says_how_it_ended(make: Make) -> None:
    store = make()
    store.append(RUN, events(1, 2))
    store.finish(RUN, "error")
    found = store.read(RUN, 0, 100)
    assert found is not None and found.ended and found.status == "error"
    assert read_bytes(store, 0) == (joined(1, 2), 2)
    store.append(RUN, events(3, 3))  # nothing is added once it ended
    assert read_bytes(store, 0) == (joined(1, 2), 2)
    info = store.get(RUN)
    assert info is not None and not info.running


@pytest.mark.parametrize("change", ["append", "finish"])
def test_a_waiter_wakes_when_events_come_or_the_run_ends(make: Make, change: str) -> None:
    store = make()
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: (store.wait(RUN, 0, timeout=30), woke.set()))
    waiter.start()
    time.sleep(0.2)
    assert not woke.is_set()  # nothing after seq 0 yet: it waits
    if change == "append":
        store.append(RUN, events(1, 1))
    else:
        store.finish(RUN, "complete")
    assert woke.wait(10)  # woken by the change, long before its 30 s timeout
    waiter.join(5)


def test_many_waiters_on_several_runs_each_wake_for_their_own(make: Make) -> None:
    store = make()
    others = [f"{n:032x}" for n in range(1, 4)]
    for run_id in others:
        store.create(run_id, "run", "/p", None)
    woke = {run_id: threading.Event() for run_id in others}
    waiters = [
        threading.Thread(target=lambda r=run_id: (store.wait(r, 0, timeout=30), woke[r].set()))
        for run_id in others
    ]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.2)
    store.append(others[1], [(1, b"x")])
    assert woke[others[1]].wait(10)
    time.sleep(0.2)
    assert not woke[others[0]].is_set() and not woke[others[2]].is_set()
    for run_id in (others[0], others[2]):
        store.finish(run_id, "complete")
    for waiter in waiters:
        waiter.join(10)
    assert all(event.is_set() for event in woke.values())


def test_a_wait_returns_at_once_when_there_is_already_more(make: Make) -> None:
    store = make()
    store.append(RUN, events(1, 2))
    started = time.monotonic()
    store.wait(RUN, 1, timeout=30)
    assert time.monotonic() - started < 10


def test_clients_attach_and_the_last_one_leaving_marks_the_run_idle(make: Make) -> None:
    store = make()
    store.attach(RUN)
    store.attach(RUN)
    info = store.get(RUN)
    assert info is not None and info.clients == 2 and info.idle_since is None
    store.detach(RUN)
    info = store.get(RUN)
    assert info is not None and info.clients == 1 and info.idle_since is None
    before = time.time()
    store.detach(RUN)
    info = store.get(RUN)
    assert info is not None and info.clients == 0
    assert info.idle_since is not None and info.idle_since >= before - 1


def test_a_cancel_ends_the_run_at_once_with_its_event_last_and_refuses_the_producer(make: Make) -> None:
    store = make()
    store.append(RUN, events(1, 2))
    assert store.cancel(RUN, b"event: error\ndata: cancelled\n\n") is True
    found = store.read(RUN, 2, 100)
    assert found is not None and found.ended and found.status == "cancelled" and found.last_seq == 3
    assert (
        b"".join(data for _, data in found.events)
        == f"id: {RUN}:3\n".encode() + b"event: error\ndata: cancelled\n\n"
    )
    assert store.append(RUN, events(3, 3)) is False  # its producer learns that it must stop
    assert store.finish(RUN, "complete", b"data: late\n\n") is False  # and its end changes nothing
    assert store.cancel(RUN, b"event: error\ndata: again\n\n") is True  # it exists: 204, once more
    assert store.read(RUN, 0, 100).last_seq == 3  # type: ignore[union-attr]
    assert store.cancel("c" * 32, b"data: x\n\n") is False
    assert store.get("c" * 32) is None  # asking made nothing


def test_a_run_finished_with_an_event_keeps_it_as_its_last_with_the_next_seq(make: Make) -> None:
    store = make()
    store.append(RUN, events(1, 1))
    assert store.finish(RUN, "shutdown", b"event: shutdown\ndata: \n\n") is True
    found = store.read(RUN, 1, 100)
    assert found is not None and found.status == "shutdown" and found.last_seq == 2
    assert b"".join(data for _, data in found.events) == f"id: {RUN}:2\nevent: shutdown\ndata: \n\n".encode()
    assert store.append(RUN, events(2, 2)) is False


def test_a_heartbeat_reads_the_states_of_the_runs_produced_here(make: Make) -> None:
    store = make()
    store.attach(RUN)
    info = store.heartbeat([RUN])[RUN]  # a run that never appended: read at every beat
    assert info is not None and info.running and info.clients == 1 and info.idle_since is None
    store.cancel(RUN, b"data: x\n\n")
    info = store.heartbeat([RUN])[RUN]
    assert info is not None and info.status == "cancelled"
    assert store.heartbeat(["d" * 32]) == {"d" * 32: None}
    store.detach(RUN)


def test_an_ended_run_is_forgotten_after_the_ttl_and_a_running_one_is_not(make: Make) -> None:
    store = make(ttl=0.2)
    store.create("b" * 32, "run", "/p", None)
    store.finish(RUN, "complete")
    deadline = time.monotonic() + 10
    while store.get(RUN) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        store.expire()
    assert store.read(RUN, 0, 10) is None
    assert store.get("b" * 32) is not None


# --- each store's own ---------------------------------------------------------------------------


def memory(**bounds: Any) -> MemoryRunStore:
    store = MemoryRunStore(**{"max_events": 100, "max_bytes": 1 << 20, "max_runs": 10, "ttl": 60.0, **bounds})
    store.create(RUN, "run", "", None)
    return store


def test_memory_bounds_bytes_too_but_keeps_the_newest_event() -> None:
    by_bytes = memory(max_bytes=25)
    by_bytes.append(RUN, [(seq, b"x" * 10) for seq in range(1, 5)])
    found = by_bytes.read(RUN, 0, 100)
    assert found is not None and [seq for seq, _ in found.events] == [3, 4] and found.missed == 2
    huge = memory(max_bytes=5)
    huge.append(RUN, [(1, b"x" * 50), (2, b"y" * 50)])
    found = huge.read(RUN, 0, 100)
    assert found is not None and [seq for seq, _ in found.events] == [2]


def test_memory_refuses_runs_beyond_max_runs_until_ended_ones_expire() -> None:
    store = memory(max_runs=1, ttl=0.05)
    with pytest.raises(StoreFull) as info:
        store.create("b" * 32, "run", "", None)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "1"
    store.finish(RUN, "complete")
    time.sleep(0.1)
    store.create("b" * 32, "run", "", None)  # the ended one made room
    assert len(store) == 1 and store.pending()


def test_memory_budget_forgets_ended_runs_oldest_first_then_refuses_new_runs() -> None:
    # Each run may hold 100 bytes; all of them together 250: a new run needs 150 held at most.
    store = memory(max_bytes=100, budget=250)
    a, b, c, d = RUN, "b" * 32, "c" * 32, "d" * 32
    store.append(a, [(1, b"a" * 60)])
    store.finish(a, "complete")
    store.create(c, "run", "", None)
    store.append(c, [(1, b"c" * 80)])
    store.create(b, "run", "", None)
    store.append(b, [(1, b"b" * 60)])
    store.finish(b, "complete")
    assert store.nbytes == 200 and store.get(a) is not None
    store.create(d, "run", "", None)  # no room for 100 more: the oldest ended run went first
    assert store.get(a) is None and store.read(a, 0, 10) is None and store.get(b) is not None
    assert store.nbytes == 140
    store.append(d, [(1, b"d" * 100)])
    store.append(c, [(2, b"c" * 20)])  # over the budget: the other ended run goes too
    assert store.get(b) is None and store.nbytes == 200
    # Running runs fill it: a new run is refused until one ends.
    with pytest.raises(StoreFull) as info:
        store.create("e" * 32, "run", "", None)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "30"
    assert "250 bytes" in info.value.message
    store.finish(c, "complete")
    store.create("e" * 32, "run", "", None)  # the ended run made room
    assert store.get(c) is None and store.get(d) is not None and store.nbytes == 100


def test_memory_running_runs_over_the_budget_keep_their_share_and_readers_learn_what_they_missed() -> None:
    # Many runs started before any held much: together they overfill the budget.
    store = memory(max_bytes=100, budget=120)
    other = "b" * 32
    store.create(other, "run", "", None)
    store.append(RUN, [(seq, b"x" * 10) for seq in range(1, 9)])  # 80 bytes, within its own bound
    store.append(other, [(seq, b"y" * 10) for seq in range(1, 9)])  # 160 held: down to its share
    assert store.nbytes == 140  # the one that appended is at its share, 60; the other above it
    found = store.read(other, 0, 100)
    assert found is not None and found.missed == 2 and [seq for seq, _ in found.events] == list(range(3, 9))
    store.append(RUN, [(9, b"x" * 10)])  # the other one, appending, is brought to its share
    found = store.read(RUN, 0, 100)
    assert found is not None and found.missed == 3 and found.events[-1][0] == 9
    assert store.nbytes == 120
    # Its newest event is always kept, whatever its size.
    store.append(RUN, [(10, b"z" * 100)])
    found = store.read(RUN, 0, 100)
    assert found is not None and [seq for seq, _ in found.events] == [10]


def test_redis_bounds_the_runs_this_process_produces(redis_url: str) -> None:
    from flask_sse_run.runs.redis_store import RedisRunStore

    store = RedisRunStore(
        redis_url, prefix=f"t-{uuid.uuid4().hex}:", max_events=10, max_runs=1, ttl=5, window=5
    )
    store.create(RUN, "run", "", None)
    with pytest.raises(StoreFull):
        store.create("b" * 32, "run", "", None)
    store.finish(RUN, "complete")
    store.create("b" * 32, "run", "", None)
    store.close()


def test_redis_keys_are_under_the_prefix_share_the_runs_slot_and_all_expire(redis_url: str) -> None:
    import redis

    from flask_sse_run.runs.redis_store import LEASE_MS, RedisRunStore

    prefix = f"app-{uuid.uuid4().hex}:"
    store = RedisRunStore(redis_url, prefix=prefix, max_events=10, max_runs=5, ttl=5, window=5)
    store.create(RUN, "run", "", None)
    store.append(RUN, [(1, b"x")])
    client = redis.Redis.from_url(redis_url)
    base = f"{prefix}run:{{{RUN}}}"  # the hash tag: one slot of a cluster for the run's keys
    keys = [base.encode(), f"{base}:events".encode(), f"{base}:lease".encode()]
    assert sorted(client.keys(f"{prefix}*")) == keys
    assert 0 < client.ttl(base) <= 120 and 0 < client.ttl(f"{base}:events") <= 120  # running: they expire
    assert 0 < client.pttl(f"{base}:lease") <= LEASE_MS
    store.finish(RUN, "complete")
    assert sorted(client.keys(f"{prefix}*")) == keys[:2]  # no producer: no lease
    assert all(0 < client.ttl(key) <= 5 for key in client.keys(f"{prefix}*"))
    client.close()
    store.close()


def test_redis_the_bytes_a_run_holds_are_counted_exactly_under_both_bounds(redis_url: str) -> None:
    import redis

    from flask_sse_run.runs.redis_store import RedisRunStore

    prefix = f"t-{uuid.uuid4().hex}:"
    store = RedisRunStore(redis_url, prefix=prefix, max_events=20, max_bytes=300, max_runs=5, ttl=5, window=5)
    store.create(RUN, "run", "", None)
    client = redis.Redis.from_url(redis_url)
    base = f"{prefix}run:{{{RUN}}}"
    seq = 0
    for size in [1, 5, 2, 40, 1, 3, 100, 7, 1, 1, 30, 2, 19, 1]:  # either bound bites, or none
        store.append(RUN, [(n, b"%d:" % n + b"x" * (n % 11)) for n in range(seq + 1, seq + size + 1)])
        seq += size
        entries = [
            (int(entry_id.split(b"-")[0]), fields) for entry_id, fields in client.xrange(f"{base}:events")
        ]
        held = sum(len(fields[b"d"]) for _, fields in entries)
        counted = [int(value) for value in client.hmget(base, "held", "head", "head_bytes")]
        assert counted == [held, entries[0][0], len(entries[0][1][b"d"])]
        # The newest batches, whole and in order, within both bounds (the newest always kept).
        assert entries[-1][0] == seq
        assert all(
            int(fields[b"s"]) == before + 1 for (before, _), (_, fields) in itertools.pairwise(entries)
        )
        assert len(entries) == 1 or (held <= 300 and entries[0][0] > seq - 20)
    client.close()
    store.close()


def test_redis_a_follower_leaving_a_run_whose_keys_expired_makes_no_key(redis_url: str) -> None:
    # A detach recreated the vanished hash with HINCRBY, with no expiry: it stayed forever.
    import redis

    from flask_sse_run.runs.redis_store import RedisRunStore

    prefix = f"t-{uuid.uuid4().hex}:"
    store = RedisRunStore(redis_url, prefix=prefix, max_events=10, max_runs=5, ttl=5, window=5)
    store.create(RUN, "run", "", None)
    store.attach(RUN)
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.keys(f"{prefix}*"))  # as their expiry does
    store.detach(RUN)
    store.attach(RUN)
    store.detach(RUN)
    assert client.keys(f"{prefix}*") == []
    assert store.cancel(RUN, b"data: x\n\n") is False and client.keys(f"{prefix}*") == []
    client.close()
    store.close()


@pytest.fixture(params=["standalone", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """A Redis URL, and whether it is a cluster's."""
    if request.param == "cluster":
        return request.getfixturevalue("cluster").url, True
    return request.getfixturevalue("redis_url"), False


def test_redis_a_run_whose_producer_stops_beating_is_lost_for_its_followers(
    any_redis: tuple[str, bool],
) -> None:
    from flask_sse_run.runs.redis_store import LEASE_MS, RedisRunStore

    url, on_cluster = any_redis
    prefix = f"t-{uuid.uuid4().hex}:"
    settings: dict[str, Any] = {"max_events": 10, "max_runs": 5, "ttl": 5, "window": 5, "cluster": on_cluster}
    producer = RedisRunStore(url, prefix=prefix, **settings)
    follower = RedisRunStore(url, prefix=prefix, **settings)
    producer.create(RUN, "run", "", None)
    producer.append(RUN, events(1, 1))
    follower.attach(RUN)
    # While its producer beats, silence is not loss: 3 lease lengths pass, it is still running.
    beating = threading.Event()

    def beat() -> None:
        while not beating.wait(0.5):
            producer.heartbeat([RUN])

    beater = threading.Thread(target=beat)
    beater.start()
    until = time.monotonic() + 3 * LEASE_MS / 1000
    while time.monotonic() < until:
        follower.wait(RUN, 1, timeout=until - time.monotonic())
    found = follower.read(RUN, 1, 10)
    assert found is not None and found.status == "running" and not found.events
    # The producer's worker is gone: its followers learn it, with the reason last (how soon is
    # bench_redis's figure, not an assertion).
    beating.set()
    beater.join(5)
    stopped = time.monotonic()
    while (found := follower.read(RUN, 1, 10)) is not None and not found.ended:
        assert time.monotonic() - stopped < 30, "never declared lost"
        follower.wait(RUN, 1, timeout=30, mark=found.mark)
    assert found is not None and found.status == "lost" and found.last_seq == 2
    assert b'"type":"ProducerLost"' in b"".join(data for _, data in found.events)
    assert producer.append(RUN, events(2, 2)) is False  # a producer that comes back is refused
    follower.detach(RUN)
    producer.close()
    follower.close()


def test_redis_a_worker_subscribes_only_to_the_runs_it_follows(redis_url: str) -> None:
    import redis

    from flask_sse_run.runs.redis_store import RedisRunStore

    prefix = f"t-{uuid.uuid4().hex}:"
    a = RedisRunStore(redis_url, prefix=prefix, max_events=10, max_runs=5, ttl=5, window=5)
    b = RedisRunStore(redis_url, prefix=prefix, max_events=10, max_runs=5, ttl=5, window=5)
    other = "b" * 32
    a.create(RUN, "run", "", None)
    b.create(other, "run", "", None)
    a.attach(RUN)
    admin = redis.Redis.from_url(redis_url)

    def subscribers(run_id: str) -> int:
        channel = f"{prefix}run:{{{run_id}}}:changed"
        reply = admin.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # [channel, count]
        return int(reply[1])

    deadline = time.monotonic() + 10
    while subscribers(RUN) != 1:
        assert time.monotonic() < deadline, "never subscribed"
        time.sleep(0.02)
    for seq in range(1, 51):  # another run's traffic, produced by another worker
        b.append(other, events(seq, seq))
    assert subscribers(other) == 0
    heard = dict(a._heard)  # type: ignore[attr-defined]
    assert set(heard) == {RUN}
    a.append(RUN, events(1, 1))
    while a._heard[RUN] == heard[RUN]:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "its own run's announcement never came"
        time.sleep(0.02)
    a.detach(RUN)
    while subscribers(RUN) != 0:
        assert time.monotonic() < deadline, "never unsubscribed"
        time.sleep(0.02)
    admin.close()
    a.close()
    b.close()


@pytest.mark.parametrize("on_cluster", [False, True], ids=["standalone", "cluster"])
def test_redis_that_cannot_be_reached_is_unavailable_not_a_hang(
    tmp_path: Path, on_cluster: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from flask_sse_run.runs.redis_store import TIMEOUT, RedisRunStore
    from tests.live import free_port

    # Made without a Redis (an app starts while Redis is away): its calls are 503s.
    store = RedisRunStore(
        f"redis://127.0.0.1:{free_port()}/0",
        prefix="x:",
        max_events=10,
        max_runs=5,
        ttl=5,
        window=5,
        cluster=on_cluster,
    )
    started = time.monotonic()
    for call in (
        lambda: store.create(RUN, "run", "", None),
        lambda: store.get(RUN),
        lambda: store.read(RUN, 0, 1),
    ):
        with pytest.raises(StoreUnavailable) as info:
            call()
        assert info.value.status == 503 and info.value.headers["Retry-After"]
    assert time.monotonic() - started < 3 * TIMEOUT + 5
    # Clients are told "try again"; the log says why, once for the outage, not once per call.
    said = [r.getMessage() for r in caplog.records if r.name == "flask_sse_run.runs"]
    assert len(said) == 1 and said[0].startswith("the Redis run store is unavailable: "), said
    assert ("Cluster" if on_cluster else "ConnectionError") in said[0]
    store.close()


def test_redis_calls_beyond_the_pool_wait_for_a_connection_instead_of_failing(redis_url: str) -> None:
    # A thousand runs starting at once on one worker got 503s: redis-py's default pool raises
    # "Too many connections" past its size. Here the pool holds 2 (the URL's max_connections)
    # and Redis stalls every call for a moment, so that 12 calls all want a connection at once.
    import redis

    from flask_sse_run.runs.redis_store import RedisRunStore

    store = RedisRunStore(
        f"{redis_url}?max_connections=2", prefix=f"t-{uuid.uuid4().hex}:", max_events=10,
        max_runs=5, ttl=5, window=5,
    )  # fmt: skip
    store.create(RUN, "run", "", None)
    admin = redis.Redis.from_url(redis_url)
    admin.client_pause(300)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(store.get(RUN))
        except StoreUnavailable as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    admin.close()
    assert len(results) == 12
    assert not [r for r in results if isinstance(r, StoreUnavailable)]
    assert len(store._redis.connection_pool._connections) <= 2  # type: ignore[attr-defined]
    store.close()


def _hmget_calls(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


def test_redis_a_follower_waits_on_announcements_without_asking_redis_again(redis_url: str) -> None:
    # A thousand followed runs each asked Redis (HMGET) before every wait: 18% of a worker.
    # After a read, the subscriber's count of announcements says whether anything changed.
    import redis

    from flask_sse_run.runs.redis_store import RedisRunStore

    store = RedisRunStore(
        redis_url, prefix=f"t-{uuid.uuid4().hex}:", max_events=10, max_runs=5, ttl=5, window=5
    )
    admin = redis.Redis.from_url(redis_url)
    store.create(RUN, "run", "", None)
    store.attach(RUN)
    store.wait(RUN, 0, timeout=0.2)  # no mark: asks Redis; starts the subscriber
    deadline = time.monotonic() + 5
    while store.read(RUN, 0, 10).mark is None:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the subscriber never subscribed"
        time.sleep(0.02)

    found = store.read(RUN, 0, 10)
    assert found is not None and not found.events and found.mark is not None
    before = _hmget_calls(admin)
    store.wait(RUN, 0, timeout=0.3, mark=found.mark)  # nothing changes: it times out
    assert _hmget_calls(admin) == before

    # A change made after the read began, heard before the wait: the wait returns at once.
    found = store.read(RUN, 0, 10)
    assert found is not None
    heard = store._heard[RUN]  # type: ignore[attr-defined]
    store.append(RUN, events(1, 1))
    while store._heard.get(RUN) == heard:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline + 5, "the announcement never came"
        time.sleep(0.02)
    started = time.monotonic()
    store.wait(RUN, 0, timeout=30, mark=found.mark)
    assert time.monotonic() - started < 5

    # A change announced while it waits wakes it.
    found = store.read(RUN, 1, 10)
    assert found is not None and not found.events
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: (store.wait(RUN, 1, timeout=30, mark=found.mark), woke.set()))
    waiter.start()
    time.sleep(0.2)
    assert not woke.is_set()
    store.append(RUN, events(2, 2))
    assert woke.wait(10)
    waiter.join(5)
    store.detach(RUN)
    assert RUN not in store._heard  # type: ignore[attr-defined]  # nothing kept for runs nobody follows
    admin.close()
    store.close()


def _cluster_store(cluster: RedisCluster, prefix: str) -> Any:
    from flask_sse_run.runs.redis_store import RedisRunStore

    return RedisRunStore(
        cluster.url, prefix=prefix, max_events=10, max_runs=100, ttl=5, window=5, cluster=True
    )


def _node_clients(cluster: RedisCluster) -> dict[int, Any]:
    import redis

    return {node.port: redis.Redis.from_url(node.url) for node in cluster.nodes}


def test_redis_cluster_spreads_runs_over_its_nodes_each_with_its_keys_on_one(cluster: RedisCluster) -> None:
    prefix = f"t-{uuid.uuid4().hex}:"
    store = _cluster_store(cluster, prefix)
    runs = [uuid.uuid4().hex for _ in range(30)]
    for run_id in runs:
        store.create(run_id, "run", "", None)
        store.append(run_id, events(1, 2))
    nodes = _node_clients(cluster)
    holders = {port: {key.decode() for key in client.keys(f"{prefix}*")} for port, client in nodes.items()}
    for run_id in runs:
        base = f"{prefix}run:{{{run_id}}}"
        keys = {base, f"{base}:events", f"{base}:lease"}
        assert [port for port, held in holders.items() if keys <= held] != []  # all three on one node
        assert sum(bool(keys & held) for held in holders.values()) == 1  # and on no other
    assert sum(bool(held) for held in holders.values()) >= 2  # 30 runs on one of 3 nodes: 3^-29
    for client in nodes.values():
        client.close()
    store.close()


def _shard_subscribers(client: Any, channel: str) -> int:
    return int(client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])


def test_redis_cluster_a_worker_subscribes_on_the_node_of_each_run_it_follows(cluster: RedisCluster) -> None:
    import redis

    prefix = f"t-{uuid.uuid4().hex}:"
    producer, follower = _cluster_store(cluster, prefix), _cluster_store(cluster, prefix)
    runs = [uuid.uuid4().hex for _ in range(12)]
    admin = redis.RedisCluster.from_url(cluster.url)
    nodes = _node_clients(cluster)

    def owner(run_id: str) -> Any:
        return nodes[admin.get_node_from_key(f"{prefix}run:{{{run_id}}}:changed").port]

    assert len({owner(run_id) for run_id in runs}) >= 2
    for run_id in runs:
        producer.create(run_id, "run", "", None)
        follower.attach(run_id)
    deadline = time.monotonic() + 20
    for run_id in runs:
        channel = f"{prefix}run:{{{run_id}}}:changed"
        while _shard_subscribers(owner(run_id), channel) != 1:
            assert time.monotonic() < deadline, "never subscribed on its node"
            time.sleep(0.02)
    # Each followed run's announcements wake its waiter, whichever node carries it.
    for seq, run_id in enumerate(runs, start=1):
        found = follower.read(run_id, 0, 10)
        assert found is not None and found.mark is not None  # subscribed: a mark, no polling
        producer.append(run_id, events(seq, seq))
        follower.wait(run_id, 0, timeout=10, mark=found.mark)
        assert follower.read(run_id, 0, 10).last_seq == seq  # type: ignore[union-attr]
    for run_id in runs:
        follower.detach(run_id)
    for run_id in runs:
        while _shard_subscribers(owner(run_id), f"{prefix}run:{{{run_id}}}:changed") != 0:
            assert time.monotonic() < deadline, "never unsubscribed"
            time.sleep(0.02)
    admin.close()
    for client in nodes.values():
        client.close()
    producer.close()
    follower.close()


def test_redis_cluster_a_followed_run_whose_slot_moves_is_followed_on_its_new_node(
    cluster: RedisCluster,
) -> None:
    import redis

    prefix = f"t-{uuid.uuid4().hex}:"
    producer, follower = _cluster_store(cluster, prefix), _cluster_store(cluster, prefix)
    run_id = uuid.uuid4().hex
    channel = f"{prefix}run:{{{run_id}}}:changed"
    producer.create(run_id, "run", "", None)
    producer.append(run_id, events(1, 1))
    follower.attach(run_id)
    admin = redis.RedisCluster.from_url(cluster.url)
    slot = admin.keyslot(channel)
    source = admin.get_node_from_key(channel)
    target = next(node for node in admin.get_primaries() if node.name != source.name)
    nodes = _node_clients(cluster)
    deadline = time.monotonic() + 20
    while _shard_subscribers(nodes[source.port], channel) != 1:
        assert time.monotonic() < deadline, "never subscribed"
        time.sleep(0.02)
    # Move the slot the way redis-cli --cluster reshard does, keys and all.
    ids = {port: client.cluster("myid") for port, client in nodes.items()}
    ids = {port: (value.decode() if isinstance(value, bytes) else value) for port, value in ids.items()}
    nodes[target.port].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
    nodes[source.port].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
    keys = nodes[source.port].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
    nodes[source.port].execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for client in nodes.values():
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
    # The follower is subscribed on the new owner, and its announcements wake the waiter.
    while _shard_subscribers(nodes[target.port], channel) != 1:
        assert time.monotonic() < deadline, "never subscribed on the slot's new node"
        time.sleep(0.02)
    while (found := follower.read(run_id, 1, 10)) is None or found.mark is None:
        assert time.monotonic() < deadline, "never a mark again"
        time.sleep(0.02)
    heard = follower._heard[run_id]
    assert producer.append(run_id, events(2, 2)) is True
    follower.wait(run_id, 1, timeout=10, mark=found.mark)
    assert follower._heard[run_id] != heard  # woken by the announcement, heard on the new node
    assert follower.read(run_id, 1, 10).last_seq == 2  # type: ignore[union-attr]
    follower.detach(run_id)
    admin.close()
    for client in nodes.values():
        client.close()
    producer.close()
    follower.close()


@pytest.mark.parametrize("on_cluster", [False, True], ids=["standalone", "cluster"])
def test_redis_over_tls_rediss_urls_work(tmp_path: Path, on_cluster: bool) -> None:
    from flask_sse_run.runs.redis_store import RedisRunStore
    from tests.redis_server import RedisCluster as Cluster

    with Cluster(tmp_path, tls=True) if on_cluster else RedisServer(tmp_path, tls=True) as server:
        assert server.url.startswith("rediss://")
        settings: dict[str, Any] = {
            "max_events": 10,
            "max_runs": 5,
            "ttl": 5,
            "window": 5,
            "cluster": on_cluster,
        }
        producer, follower = (RedisRunStore(server.url, prefix="tls:", **settings) for _ in range(2))
        producer.create(RUN, "run", "", None)
        follower.attach(RUN)
        deadline = time.monotonic() + 20
        while (found := follower.read(RUN, 0, 10)) is None or found.mark is None:  # subscribed
            assert time.monotonic() < deadline, "never subscribed"
            time.sleep(0.02)
        producer.append(RUN, events(1, 2))
        follower.wait(RUN, 0, timeout=10, mark=found.mark)
        assert read_bytes(follower, 0) == (joined(1, 2), 2)
        producer.finish(RUN, "complete")
        follower.detach(RUN)
        producer.close()
        follower.close()
