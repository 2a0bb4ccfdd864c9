"""flask-sse-run: serve plain Python generators as Server-Sent Events from a Flask app."""

from __future__ import annotations

from .errors import ConfigurationError, RegistrationError, RequestError, SSERunError
from .events import Event
from .extension import SSERun

__all__ = [
    "ConfigurationError",
    "Event",
    "RegistrationError",
    "RequestError",
    "SSERun",
    "SSERunError",
]
