"""Runs across replicas on a Redis Cluster: a real 3-node cluster (``redis-cli --cluster
create``) and two gunicorn servers (two gevent workers each), each given a different node."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from tests.live import Server
from tests.redis_server import RedisCluster
from tests.test_runs_live import open_stream
from tests.test_runs_redis_live import Counters, delete_on_the_other, resume_on_the_other, two_replicas


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with RedisCluster(tmp_path_factory.mktemp("cluster")) as made:
        yield made


@pytest.fixture(scope="module")
def replicas(
    cluster: RedisCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    # Each replica names another node: the others are learnt from it.
    urls = (cluster.nodes[0].url, cluster.nodes[1].url)
    with two_replicas(urls, tmp_path_factory, SSE_RUN_REDIS_CLUSTER=True) as both:
        yield both


def test_runs_spread_over_the_nodes_and_resume_on_the_other_replica_exactly_once(
    replicas: tuple[Server, Server], cluster: RedisCluster
) -> None:
    runs = [resume_on_the_other(*replicas, Counters(cluster.url, cluster=True), events=6) for _ in range(6)]
    holders = set()
    for node in cluster.nodes:
        client = redis.Redis.from_url(node.url)
        held = {key.decode() for key in client.keys("replicas:run:*")}
        holders |= {node.port for run_id in runs if f"replicas:run:{{{run_id}}}" in held}
        client.close()
    assert len(holders) >= 2  # six runs on one node of three: 3^-5


def test_delete_on_one_replica_ends_every_follower_on_every_replica(
    replicas: tuple[Server, Server], cluster: RedisCluster
) -> None:
    delete_on_the_other(*replicas, Counters(cluster.url, cluster=True))


def test_a_stream_through_the_cluster_arrives_progressively_to_a_follower_on_the_other_replica(
    replicas: tuple[Server, Server], cluster: RedisCluster
) -> None:
    a, b = replicas
    counters = Counters(cluster.url, cluster=True)
    client = open_stream(a, path="/shared_ticks", json={"n": 6, "interval": 0.4, "label": counters.label})
    run_id = client.response.headers["X-Run-ID"]
    follower = open_stream(b, "GET", f"/runs/{run_id}")
    arrivals = [(time.monotonic(), follower.next().data) for _ in range(6)]
    assert [value for _, value in arrivals] == [str(i) for i in range(6)]
    # Announced as produced, not read at the end: the first and last arrive well apart.
    assert arrivals[-1][0] - arrivals[0][0] > 1.0
    client.rest()
