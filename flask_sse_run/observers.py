"""The observers an app's settings ask for: who is told of each of its streams.

The one module that knows every observer: the metrics (``SSE_RUN_METRICS``), the trace (when
opentelemetry-instrumentation-flask is installed) and the log (``SSE_RUN_STREAM_LOG``). Each is
an :class:`~.stream_record.Observer` in its own module and depends on the record only.
"""

from __future__ import annotations

from importlib.util import find_spec

from .config import Settings
from .errors import ConfigurationError
from .stream_record import Observer, Observers

__all__ = ["observers_for"]


def observers_for(settings: Settings) -> Observers | None:
    """The observers ``settings`` ask for; ``None`` when there are none.

    Raises :class:`ConfigurationError` when ``SSE_RUN_METRICS`` is on without prometheus_client
    installed.
    """
    members: list[Observer] = []
    if settings.metrics:
        try:
            from .metrics import stream_metrics
        except ImportError:
            raise ConfigurationError(
                "SSE_RUN_METRICS needs prometheus_client: pip install 'flask-sse-run[metrics]'"
            ) from None
        members.append(stream_metrics())
    if _installed("opentelemetry.instrumentation.flask"):
        from .tracing import SpanObserver

        members.append(SpanObserver())
    if settings.stream_log:
        from .stream_log import LogObserver

        members.append(LogObserver())
    return Observers(tuple(members)) if members else None


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False
