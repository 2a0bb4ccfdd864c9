"""flask-sse-run: serve plain Python generators as Server-Sent Events from a Flask app."""

from __future__ import annotations

from .cancellation import CancelToken, current_token, disconnected
from .concurrency import thread_executor
from .disconnect import Interrupted
from .errors import ConfigurationError, RegistrationError, RequestError, SSERunError
from .events import Event
from .extension import SSERun
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
