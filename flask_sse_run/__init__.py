"""flask-sse-run: serve plain Python generators as Server-Sent Events from a Flask app."""

from __future__ import annotations

from .cancellation import CancelToken, current_token, disconnected
from .concurrency import thread_executor
from .disconnect import Interrupted
from .errors import ConfigurationError, RegistrationError, RequestError, SSERunError, UpstreamError
from .events import Event
from .extension import SSERun
from .relay import RelayStream, open_stream, read_events, relay
from .sse_parser import EventStreamParser, ParsedEvent
from .threads import StreamClosed, ThreadChannel, iterate_in_thread, run_in_thread

__all__ = [
    "CancelToken",
    "ConfigurationError",
    "Event",
    "EventStreamParser",
    "Interrupted",
    "ParsedEvent",
    "RegistrationError",
    "RelayStream",
    "RequestError",
    "SSERun",
    "SSERunError",
    "StreamClosed",
    "ThreadChannel",
    "UpstreamError",
    "current_token",
    "disconnected",
    "iterate_in_thread",
    "open_stream",
    "read_events",
    "relay",
    "run_in_thread",
    "thread_executor",
]
