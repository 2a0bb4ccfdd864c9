"""The app that the metrics, tracing and stream-log tests serve, in-process and under gunicorn.

``create_app()`` reads extra config from ``TEST_APP_CONFIG`` (JSON), as ``tests.apps`` does.
With ``tracing=True`` (or ``OBSERVED_TRACING=1`` under gunicorn) the app is instrumented by
opentelemetry-instrumentation-flask with the real SDK and its in-memory exporter, and
``GET /spans`` returns the finished spans as JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, current_app

from flask_sse_run import SSERun

sse = SSERun()


@sse.function
def pid(n: int = 1, interval: float = 0.0) -> Iterator[int]:
    """The worker's pid, ``n`` times, ``interval`` seconds apart (which worker served it)."""
    for i in range(n):
        if i:
            time.sleep(interval)
        yield os.getpid()


@sse.function
def fail(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError("failed on purpose")


@sse.function(resumable=True, methods=("GET", "POST"))
def run_ticks(n: int, interval: float = 0.1) -> Iterator[int]:
    for i in range(n):
        yield i
        time.sleep(interval)


@sse.function
def traced(n: int) -> Iterator[int]:
    """``n`` events, each made inside a span of its own (children of the request's span)."""
    tracer = current_app.extensions["test_tracer_provider"].get_tracer(__name__)
    for i in range(n):
        with tracer.start_as_current_span(f"item {i}"):
            yield i


def _span_json(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "parent": span.parent.span_id if span.parent is not None else None,
        "start": span.start_time / 1e9,
        "end": span.end_time / 1e9,
        "attributes": dict(span.attributes),
        "status": span.status.status_code.name,
    }


def create_app(*, tracing: bool = False, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)
    sse.init_app(app)
    if tracing or os.environ.get("OBSERVED_TRACING") == "1":
        from opentelemetry.instrumentation.flask import FlaskInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        FlaskInstrumentor().instrument_app(app, tracer_provider=provider, excluded_urls="spans")
        app.extensions["test_span_exporter"] = exporter
        app.extensions["test_tracer_provider"] = provider

        @app.get("/spans")
        def spans() -> Any:
            return [_span_json(span) for span in exporter.get_finished_spans()]

    return app
