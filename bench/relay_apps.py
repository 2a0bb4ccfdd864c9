"""A synthetic OpenAI-compatible engine for the relay benchmark's 1,000 concurrent streams.

``transformers serve`` generates one request at a time, so it cannot hold a thousand streams
open; this app does, under gunicorn's gevent worker: ``POST /v1/completions`` streams one
completion chunk per ``BENCH_ENGINE_INTERVAL`` seconds (default 1) in vLLM's shapes, a finish
chunk with usage, then ``[DONE]``; ``GET /v1/models`` lists one model. It is served by
flask-sse-run itself (``"bench.relay_apps:engine_app()"``). Nothing here is used by the tests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask

from flask_sse_run import SSERun

MODEL = "synthetic"


def engine_app() -> Flask:
    """The synthetic engine."""
    app = Flask(__name__)
    interval = float(os.environ.get("BENCH_ENGINE_INTERVAL", "1"))
    sse = SSERun(app, url_prefix="/v1")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    @sse.function(name="completions")
    def completions(
        prompt: str,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stream: bool = False,
        stream_options: dict[str, Any] | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        model: str | None = None,
    ) -> Iterator[Any]:
        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "finish_reason": finish, "stop_reason": None}
            return {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [choice]}

        for i in range(max_tokens):
            yield chunk(f" tok{i}")
            time.sleep(interval)
        last = chunk("", "length")
        last["usage"] = {"prompt_tokens": 1, "completion_tokens": max_tokens, "total_tokens": max_tokens + 1}
        yield last
        yield "[DONE]"

    return app
