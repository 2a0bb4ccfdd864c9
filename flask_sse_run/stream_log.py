"""One log line per stream, at its end: who asked, what ran, what was sent, why it ended.

``SSE_RUN_STREAM_LOG`` (on by default) writes, on the logger ``flask_sse_run.streams`` at INFO::

    stream ended request_id=3f2a... run_id=- function=run status=200 events=3 bytes=75
    duration=3.004 end=complete

(one line; cut in two here)

``run_id`` is the followed run's id (``-`` for a stream that is not a run); ``duration`` is in
seconds, from the response being made to the end; ``end`` is one of
:data:`~flask_sse_run.stream_record.ENDS`. Nothing the client sent is written but the request
id, which is the client's only when it matched ``X-Request-ID``'s plain pattern.

Like any library's logger it writes nothing until logging is set up for INFO;
:func:`log_with_gunicorn` (called by this project's ``gunicorn.conf.py``) sends it where
gunicorn's own log goes, at gunicorn's ``--log-level``.
"""

from __future__ import annotations

import logging
from typing import Any

from .stream_record import Observer, StreamRecord

__all__ = ["LOGGER_NAME", "LogObserver", "log_stream", "log_with_gunicorn"]

LOGGER_NAME = "flask_sse_run.streams"
logger = logging.getLogger(LOGGER_NAME)


def log_stream(record: StreamRecord, end: str, duration: float) -> None:
    """Write ``record``'s line (if the logger is enabled for INFO)."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "stream ended request_id=%s run_id=%s function=%s status=200 events=%d bytes=%d "
            "duration=%.3f end=%s",
            record.request_id,
            record.run_id or "-",
            record.function,
            record.events,
            record.bytes,
            duration,
            end,
        )


class LogObserver(Observer):
    """Logs each stream's line at its end (``SSE_RUN_STREAM_LOG``)."""

    def ended(self, record: StreamRecord, end: str, duration: float) -> None:
        """Write the stream's line."""
        log_stream(record, end, duration)


def log_with_gunicorn(worker: Any) -> None:
    """Call from gunicorn's ``post_worker_init``: stream lines go to gunicorn's error log.

    They take its handlers and its level (``--log-level``, INFO in ``gunicorn.conf.py``), unless
    the logger was set up already.
    """
    error_log = getattr(getattr(worker, "log", None), "error_log", None)
    if error_log is None or logger.handlers:
        return
    logger.handlers = list(error_log.handlers)
    logger.setLevel(error_log.level)
    logger.propagate = False
