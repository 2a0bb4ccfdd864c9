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
    ],
)
def test_bad_configuration_fails_at_start_up(key: str, value: Any, fragment: str) -> None:
    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(ConfigurationError, match=fragment):
        SSERun(app)
    assert "sse_run" not in app.extensions
