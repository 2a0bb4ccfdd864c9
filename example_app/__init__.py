"""The example app: an ordinary Flask app with flask-sse-run added to it."""

from __future__ import annotations

from typing import Any

from flask import Flask

from flask_sse_run.llm import init_falcon

from .functions import sse
from .page import page

__all__ = ["create_app"]


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the example app; ``config`` overrides settings (tests use it)."""
    app = Flask(__name__)
    app.config.from_prefixed_env("EXAMPLE")  # EXAMPLE_SSE_RUN_KEEPALIVE=5 and so on
    app.config.update(config or {})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.register_blueprint(page)  # GET /: the page that streams run (and Falcon), and a channel
    sse.init_app(app)
    init_falcon(app)  # POST /falcon/run, GET /falcon/health; 503 until FALCON_MODEL is set
    return app
