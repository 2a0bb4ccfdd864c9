"""The relay's live-test apps, served by real gunicorn ("tests.relay_apps:create_app()").

``create_app()`` plays both roles. As the upstream it serves generators that count what they
produce and record their ``finally`` (GET /stats shows both from outside). As the relay it serves
``relay_from``, which opens any upstream URL in the function body (a refusal is then a JSON error
before the stream) and relays its events.

``engine_app()`` streams OpenAI completion chunks in vLLM's shapes (``stop_reason``, a final
usage chunk with no choices, ``[DONE]``), which ``transformers serve`` does not send and vLLM
(GPU only) cannot run here to send; it also holds the benchmark's 1,000 concurrent streams,
which ``transformers serve`` (one generation at a time) cannot. Tests bind both to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, current_app, request

from flask_sse_run import Event, RequestError, SSERun, open_stream, relay
from flask_sse_run.relay import RelayStream
from tests.apps import live_app

sse = SSERun()

STATS: dict[str, Any] = {"produced": 0, "finally": 0, "last_finally": 0.0}


@sse.function
def relay_from(
    url: str, body: dict[str, Any] | None = None, connect_timeout: float = 5.0, silence_timeout: float = 60.0
) -> RelayStream[str | Event]:
    """Relay the event stream that POSTing ``body`` to ``url`` answers."""
    upstream = open_stream(
        url, json=body or {}, connect_timeout=connect_timeout, silence_timeout=silence_timeout
    )
    return relay(upstream)


@sse.function
def produce(n: int = 0, interval: float = 0.0, size: int = 10, silent_first: float = 0.0) -> Iterator[Event]:
    """``n`` events (0: forever) of ``size`` bytes, numbered by ``id``, ``interval`` s apart."""
    try:
        time.sleep(silent_first)
        i = 0
        while not n or i < n:
            STATS["produced"] += 1
            yield Event(data=f"{i:0{size}d}", id=str(i))
            i += 1
            if interval:
                time.sleep(interval)
    finally:
        STATS["finally"] += 1
        STATS["last_finally"] = time.time()


@sse.function
def mixed() -> Iterator[Any]:
    """Events with every field, a comment, a multi-line and an empty one."""
    yield Event(data="hello", event="greeting", id="1", retry=5000)
    yield Event(comment="just a comment")
    yield ""
    yield "two\nlines"
    yield Event(data="é ☃", id="2")
    yield [1, 2.5, True]


@sse.function
def refuse(status: int) -> Iterator[str]:
    """Refuse with ``status`` before streaming (a 500 when ``status`` is 500: the function fails)."""
    if status == 500:
        raise RuntimeError("failed before streaming")
    raise RequestError(status, f"refused with {status} on purpose", headers={"Retry-After": "3"})


#: A proxy's error page, as nginx sends one: markup that must never reach our clients.
HTML_PAGE = "<html>\r\n<head><title>{status} oops</title></head>\r\n<body><h1>{status}</h1></body>\r\n</html>"


def create_app(**config: Any) -> Flask:
    """The relay's app (``tests.relay_apps:create_app()``)."""
    app = live_app(__name__, sse, lambda: {**STATS, "pid": os.getpid()}, **config)

    @app.post("/html_error")
    def html_error() -> tuple[str, int, dict[str, str]]:
        """Answer ``{"status": N, "content_type": ...}`` with an HTML error page."""
        body = request.get_json()
        content_type = body.get("content_type", "text/html; charset=utf-8")
        return HTML_PAGE.format(status=body["status"]), body["status"], {"Content-Type": content_type}

    return app


def engine_app(**config: Any) -> Flask:
    """A synthetic OpenAI-compatible engine: ``max_tokens`` chunks ``" tok0"``, ``" tok1"``... one
    per ``ENGINE_INTERVAL`` seconds (config, default 1); ``stop`` strings are cut out and end it
    (``stop_reason``: the string), a prompt of ``"eos"`` ends after 3 tokens (``stop_reason``: null).
    """
    app = Flask(__name__)
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)
    engine = SSERun(app, url_prefix="/v1")

    ports: list[str] = []  # each completion request's client port: a reused connection keeps it

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "synthetic", "object": "model"}]}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return {"ports": ports}

    @engine.function(name="completions")
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
        interval = float(current_app.config.get("ENGINE_INTERVAL", 1.0))
        ports.append(str(request.environ.get("REMOTE_PORT")))

        def chunk(text: str, finish: str | None = None, stop_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "finish_reason": finish, "stop_reason": stop_reason}
            return {"id": "cmpl-1", "object": "text_completion", "model": "synthetic", "choices": [choice]}

        text, finish, why = "", "length", None
        for i in range(3 if prompt == "eos" else max_tokens):
            longer = text + f" tok{i}"
            found = sorted((longer.find(s), s) for s in stop or () if s in longer)
            if found:  # as vLLM: the text ends before the stop string, which is not sent
                (at, why), finish = found[0], "stop"
                if at > len(text):
                    yield chunk(longer[len(text) : at])
                break
            yield chunk(longer[len(text) :])
            text = longer
            time.sleep(interval)
        else:
            if prompt == "eos":
                finish = "stop"
        yield chunk("", finish, why)
        if stream_options and stream_options.get("include_usage"):
            usage = {"prompt_tokens": 1, "completion_tokens": len(text.split()), "total_tokens": 0}
            yield {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": "synthetic",
                "choices": [],
                "usage": usage,
            }
        yield "[DONE]"

    return app
