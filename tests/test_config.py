from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from flask_sse_run import ConfigurationError, SSERun
from flask_sse_run.config import Settings


def test_defaults_are_set_on_the_app_config() -> None:
    app = Flask(__name__)
    SSERun(app)
    assert app.config["SSE_RUN_MAX_BODY"] == 1 << 20
    assert app.config["SSE_RUN_KEEPALIVE"] == 15.0
    assert app.config["SSE_RUN_END_EVENT"] is None
    assert app.config["SSE_RUN_EXPOSE_ERRORS"] is False
    assert app.config["SSE_RUN_GZIP"] is True
    assert app.config["SSE_RUN_BODY_TIMEOUT"] == 30.0
    assert app.config["SSE_RUN_AUTH_TOKENS"] is None and app.config["SSE_RUN_JWT_KEY"] is None
    assert app.config["SSE_RUN_JWT_ALGORITHMS"] == ("HS256",)
    assert app.extensions["sse_run"].settings == Settings()


def test_values_are_read_from_config() -> None:
    app = Flask(__name__)
    app.config.update(SSE_RUN_MAX_BODY=10, SSE_RUN_END_EVENT="done", SSE_RUN_KEEPALIVE=0)
    SSERun(app)
    settings = app.extensions["sse_run"].settings
    assert (settings.max_body, settings.end_event, settings.keepalive) == (10, "done", 0)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("SSE_RUN_MAX_BODY", 0, "SSE_RUN_MAX_BODY"),
        ("SSE_RUN_MAX_BODY", "1MB", "SSE_RUN_MAX_BODY"),
        ("SSE_RUN_KEEPALIVE", -1, "SSE_RUN_KEEPALIVE"),
        ("SSE_RUN_END_EVENT", "a\nb", "SSE_RUN_END_EVENT"),
        ("SSE_RUN_EXPOSE_ERRORS", "yes", "SSE_RUN_EXPOSE_ERRORS"),
        ("SSE_RUN_KEEPALIVES", 5, "unknown configuration keys: SSE_RUN_KEEPALIVES"),
        ("SSE_RUN_BODY_TIMEOUT", -1, "SSE_RUN_BODY_TIMEOUT"),
        ("SSE_RUN_BODY_TIMEOUT", "30s", "SSE_RUN_BODY_TIMEOUT"),
        ("SSE_RUN_OPENAPI_VERSION", 1, "SSE_RUN_OPENAPI_VERSION"),
        ("SSE_RUN_OPENAPI_TITLE", ["x"], "SSE_RUN_OPENAPI_TITLE"),
        ("SSE_RUN_SEND_TIMEOUT", -1, "SSE_RUN_SEND_TIMEOUT"),
        ("SSE_RUN_RESUMABLE", "yes", "SSE_RUN_RESUMABLE"),
        ("SSE_RUN_RESUME_WINDOW", -1, "SSE_RUN_RESUME_WINDOW"),
        ("SSE_RUN_RESUME_MAX_EVENTS", 0, "SSE_RUN_RESUME_MAX_EVENTS"),
        ("SSE_RUN_MAX_RUNS", 0, "SSE_RUN_MAX_RUNS"),
        ("SSE_RUN_MAX_BYTES", 0, "SSE_RUN_MAX_BYTES"),
        ("SSE_RUN_MAX_BYTES", "256M", "SSE_RUN_MAX_BYTES"),
        ("SSE_RUN_MAX_BYTES", 1000, "SSE_RUN_MAX_BYTES must be at least SSE_RUN_RESUME_MAX_BYTES"),
        ("SSE_RUN_REDIS_PREFIX", "", "SSE_RUN_REDIS_PREFIX"),
        ("SSE_RUN_REDIS_URL", "http://user:hunter2@host/0", "SSE_RUN_REDIS_URL: not a redis://"),
        ("SSE_RUN_REDIS_URL", "redis://:hunter2@host/0?max_connections=abc", "or a query value is wrong"),
    ],
)
def test_bad_configuration_fails_at_start_up(key: str, value: Any, fragment: str) -> None:
    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(ConfigurationError, match=fragment) as info:
        SSERun(app)
    assert "sse_run" not in app.extensions
    assert "hunter2" not in str(info.value)  # a URL's password is never echoed


def test_a_redis_url_makes_the_run_store_redis_without_connecting_at_start_up() -> None:
    from flask_sse_run.runs.redis_store import RedisRunStore
    from tests.live import free_port

    app = Flask(__name__)
    app.config.update(SSE_RUN_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SSE_RUN_REDIS_PREFIX="app1:")
    SSERun(app)  # nothing listens there: starting up must not need Redis
    store = app.extensions["sse_run"].runs.store
    assert isinstance(store, RedisRunStore) and store.prefix == "app1:"


def test_a_redis_cluster_url_makes_a_cluster_store_without_connecting_at_start_up() -> None:
    from flask_sse_run.runs.redis_store import RedisRunStore
    from flask_sse_run.runs.store import StoreUnavailable
    from tests.live import free_port

    app = Flask(__name__)
    app.config.update(SSE_RUN_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SSE_RUN_REDIS_CLUSTER=True)
    SSERun(app)  # no node answers there: starting up must not need the cluster
    store = app.extensions["sse_run"].runs.store
    assert isinstance(store, RedisRunStore)
    with pytest.raises(StoreUnavailable):  # the cluster is away: its calls are 503s
        store.get("a" * 32)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("unix:///run/redis.sock", "SSE_RUN_REDIS_CLUSTER: a cluster is reached by redis://"),
        # redis-py refuses these at the first call: every run was a 503, and nothing was logged.
        ("redis://:hunter2@127.0.0.1:7000/1", "only database 0"),
        ("rediss://127.0.0.1:7000?db=2", "only database 0"),
        (None, "SSE_RUN_REDIS_CLUSTER needs SSE_RUN_REDIS_URL"),
    ],
)
def test_a_redis_cluster_url_it_cannot_use_is_refused_at_start_up(url: str | None, fragment: str) -> None:
    app = Flask(__name__)
    app.config.update(SSE_RUN_REDIS_URL=url, SSE_RUN_REDIS_CLUSTER=True)
    with pytest.raises(ConfigurationError, match=fragment) as info:
        SSERun(app)
    assert "hunter2" not in str(info.value)
