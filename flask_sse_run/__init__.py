"""flask-sse-run: serve plain Python generators as Server-Sent Events from a Flask app."""

from __future__ import annotations

from .cancellation import CancelToken, current_token, disconnected
from .concurrency import thread_executor
from .errors import ConfigurationError, RegistrationError, RequestError, SSERunError
from .events import Event
from .extension import SSERun
from .gevent_stream import Interrupted
from .threads import StreamClosed, ThreadChannel, iterate_in_thread, run_in_thread

__all__ = [
    "CancelToken",
    "ConfigurationError",
    "Event",
    "Interrupted",
    "RegistrationError",
    "RequestError",
    "SSERun",
    "SSERunError",
    "StreamClosed",
    "ThreadChannel",
    "current_token",
    "disconnected",
    "iterate_in_thread",
    "run_in_thread",
    "thread_executor",
]
