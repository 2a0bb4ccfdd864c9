"""Prometheus metrics of streams and of the LLM blueprint (``SSE_RUN_METRICS``).

Needs the ``metrics`` extra (prometheus_client); this module is imported only when metrics are
on. The metrics are made once per process, in prometheus_client's default registry (so an app
that exposes that registry itself shows them too), and shared by every app of the process.

Streams (``function`` is the function's name, ``falcon/run`` under the prefix ``/falcon``):

==========================================  =========  ========================================
``sse_run_streams_active``                  gauge      streams open now (``livesum``: the
                                                       live workers' sum)
``sse_run_streams_total{function,end}``     counter    streams ended, by ``end``
                                                       (:data:`~.stream_record.ENDS`)
``sse_run_events_total{function}``          counter    events sent (counted when a stream ends)
``sse_run_bytes_total{function}``           counter    bytes sent, gzipped, pings included
``sse_run_stream_duration_seconds``         histogram  from the response to the end
``sse_run_first_event_seconds``             histogram  from the response to its first event
``sse_run_refused_total{status}``           counter    the extension's error answers (4xx, 5xx)
==========================================  =========  ========================================

Channels (their streams are counted above, as the function ``channels``):

==========================================  =========  ========================================
``sse_run_channel_published_total``         counter    events published by this process
``sse_run_channel_feeds``                   gauge      channels followed (one feed each per
                                                       worker; ``livesum``)
==========================================  =========  ========================================

Under gunicorn with several workers, set ``PROMETHEUS_MULTIPROC_DIR``: each worker then writes
its metrics to files there, and :func:`metrics_view` serves the sum of every worker's (see
:mod:`.metrics_files` for the hooks in ``gunicorn.conf.py``). Without it each worker counts
alone, and a scrape sees the one worker that answers it.

The LLM metrics (:func:`llm_metrics`) are named after OpenTelemetry's GenAI semantic
conventions (``gen_ai.server.time_to_first_token``, ``gen_ai.server.time_per_output_token``),
with their bucket boundaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flask import Flask, Response, request

from .extras import missing_extra

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.multiprocess import MultiProcessCollector
except ImportError as error:
    raise missing_extra("metrics", error) from error

from .metrics_files import MULTIPROC_ENV, compact, scrape_lock
from .stream_record import Observer, StreamRecord

__all__ = [
    "ChannelMetrics",
    "LLMMetrics",
    "StreamMetrics",
    "channel_metrics",
    "count_refusals",
    "llm_metrics",
    "metrics_view",
    "serve_metrics",
    "stream_metrics",
]

#: Stream durations: a one-event answer to an hour-long feed.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
#: Time to a stream's first event.
FIRST_EVENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: OpenTelemetry GenAI's boundaries for ``gen_ai.server.time_to_first_token``.
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
#: ... for ``gen_ai.server.time_per_output_token``.
TIME_PER_OUTPUT_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
#: ... for ``gen_ai.server.request.duration``, used for the time a request queues.
QUEUE_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


class StreamMetrics(Observer):
    """The stream metrics of this process (see the module docstring); one per process, an
    observer of every stream."""

    def __init__(self) -> None:
        self.active = Gauge("sse_run_streams_active", "Streams open now.", multiprocess_mode="livesum")
        self.streams = Counter("sse_run_streams_total", "Streams ended, by how.", ["function", "end"])
        self.events = Counter("sse_run_events_total", "Events sent by streams that ended.", ["function"])
        self.bytes = Counter("sse_run_bytes_total", "Bytes sent by streams that ended.", ["function"])
        self.duration = Histogram(
            "sse_run_stream_duration_seconds",
            "Seconds from a stream's response to its end.",
            ["function"],
            buckets=DURATION_BUCKETS,
        )
        self.first_event = Histogram(
            "sse_run_first_event_seconds",
            "Seconds from a stream's response to the write of its first event.",
            ["function"],
            buckets=FIRST_EVENT_BUCKETS,
        )
        self.refused = Counter("sse_run_refused_total", "Error answers of the extension.", ["status"])

    def started(self, record: StreamRecord) -> None:
        """A stream's body started."""
        self.active.inc()

    def ended(self, record: StreamRecord, end: str, duration: float) -> None:
        """A stream ended: one call per stream, whatever it sent."""
        self.active.dec()
        function = record.function
        self.streams.labels(function, end).inc()
        if record.events:
            self.events.labels(function).inc(record.events)
        self.bytes.labels(function).inc(record.bytes)
        self.duration.labels(function).observe(duration)
        if record.first_event is not None:
            self.first_event.labels(function).observe(record.first_event)


@dataclass(frozen=True)
class LLMMetrics:
    """The LLM blueprint's metrics; what each one is for is in its field's comment."""

    #: Seconds from a request's arrival to its first generated token (``observe`` once per request).
    time_to_first_token: Histogram
    #: Seconds per output token after the first: (end - first token) / (tokens - 1), per request.
    time_per_output_token: Histogram
    #: Tokens generated (``inc(n)``).
    tokens: Counter
    #: Seconds a request waited for a place in a batch.
    queue: Histogram
    #: Rows of the batch being decoded now (``set`` at each step; ``livesum`` over workers).
    batch_rows: Gauge
    #: Tokens computed for requests whose client had already left (``inc(n)``).
    tokens_after_cancel: Counter


@dataclass(frozen=True)
class ChannelMetrics:
    """The channels' metrics (``sse_run_channel_*``)."""

    #: Events published by this process (``inc()`` per publish).
    published: Counter
    #: Channels this worker follows now (``set(n)``).
    feeds: Gauge


_streams: StreamMetrics | None = None
_channels: ChannelMetrics | None = None
_llm: LLMMetrics | None = None


def stream_metrics() -> StreamMetrics:
    """This process's stream metrics, made on the first call."""
    global _streams
    if _streams is None:
        _streams = StreamMetrics()
    return _streams


def channel_metrics() -> ChannelMetrics:
    """This process's channel metrics, made on the first call."""
    global _channels
    if _channels is None:
        _channels = ChannelMetrics(
            published=Counter("sse_run_channel_published_total", "Events published on channels."),
            feeds=Gauge(
                "sse_run_channel_feeds", "Channels followed by the worker.", multiprocess_mode="livesum"
            ),
        )
    return _channels


def llm_metrics() -> LLMMetrics:
    """This process's LLM metrics, made on the first call (``sse_run_llm_*``).

    The blueprint records them when the app has ``SSE_RUN_METRICS`` on; they are served with
    the stream metrics.
    """
    global _llm
    if _llm is None:
        _llm = LLMMetrics(
            time_to_first_token=Histogram(
                "sse_run_llm_time_to_first_token_seconds",
                "Seconds from a generation request's arrival to its first token.",
                buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            ),
            time_per_output_token=Histogram(
                "sse_run_llm_time_per_output_token_seconds",
                "Seconds per output token after the first, per request.",
                buckets=TIME_PER_OUTPUT_TOKEN_BUCKETS,
            ),
            tokens=Counter("sse_run_llm_tokens_total", "Tokens generated."),
            queue=Histogram(
                "sse_run_llm_queue_seconds",
                "Seconds a generation request waited for a place in a batch.",
                buckets=QUEUE_BUCKETS,
            ),
            batch_rows=Gauge(
                "sse_run_llm_batch_rows", "Rows of the batch being decoded now.", multiprocess_mode="livesum"
            ),
            tokens_after_cancel=Counter(
                "sse_run_llm_tokens_after_cancel_total",
                "Tokens computed for requests whose client had already left.",
            ),
        )
    return _llm


def count_refusals(response: Response) -> Response:
    """An ``after_request`` hook: count the extension's error answers by status."""
    if response.status_code >= 400 and (request.endpoint or "").startswith("sse_run."):
        stream_metrics().refused.labels(str(response.status_code)).inc()
    return response


def metrics_view() -> Response:
    """``GET`` the metrics in Prometheus's text format (or OpenMetrics, if the client asks).

    With ``PROMETHEUS_MULTIPROC_DIR`` set, every worker's, summed (dead workers' files are
    merged first, see :mod:`.metrics_files`); otherwise this process's default registry. Mount
    it where you like (``app.add_url_rule("/internal/metrics", view_func=metrics_view)``) when
    ``SSE_RUN_METRICS_PATH`` is ``None``.
    """
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
        with scrape_lock(path):
            compact(path)
            body = encoder(registry)
    else:
        body = encoder(REGISTRY)
    return Response(body, content_type=content_type)


def serve_metrics(app: Flask, path: str | None) -> None:
    """Count ``app``'s refusals, and serve :func:`metrics_view` at ``GET path`` (if a path)."""
    app.after_request(count_refusals)
    if path is not None:
        app.add_url_rule(path, "sse_run.metrics", metrics_view, methods=["GET"])
