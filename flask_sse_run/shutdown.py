"""Graceful shutdown: tell open streams to finish with a final event instead of being cut.

gunicorn's gevent worker, on SIGTERM, stops accepting and waits up to ``graceful_timeout``
for open requests, then kills them mid-write. Streams can run for hours, so instead
:func:`begin_shutdown` asks each open stream to send its shutdown event and end cleanly.
:func:`install_gunicorn_hook` wires it to the worker's SIGTERM (see ``gunicorn.conf.py``).
"""

from __future__ import annotations

import signal
import weakref
from typing import Any, Protocol

from .concurrency import gevent_patched

__all__ = ["begin_shutdown", "install_gunicorn_hook", "register", "shutting_down", "unregister"]


class _Stoppable(Protocol):
    def shutdown(self) -> None: ...


_streams: weakref.WeakSet[Any] = weakref.WeakSet()
_state = {"shutting_down": False}


def register(stream: _Stoppable) -> None:
    """Track an open stream (weakly, so that a stream dropped without ending is not kept)."""
    _streams.add(stream)


def unregister(stream: _Stoppable) -> None:
    """Stop tracking a stream that has ended."""
    _streams.discard(stream)


def shutting_down() -> bool:
    """Whether :func:`begin_shutdown` has been called in this process."""
    return _state["shutting_down"]


def begin_shutdown() -> int:
    """Ask every open stream to end with its shutdown event; return how many were asked."""
    _state["shutting_down"] = True
    streams = list(_streams)
    for stream in streams:
        stream.shutdown()
    return len(streams)


def install_gunicorn_hook(worker: Any) -> None:
    """Call from gunicorn's ``post_worker_init``: SIGTERM first ends the open streams.

    The worker's own SIGTERM handler still runs, so gunicorn's graceful shutdown proceeds.
    """
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        if gevent_patched():
            import gevent

            # A signal handler must not switch greenlets: do the work in one of its own.
            gevent.spawn(begin_shutdown)
        else:  # sync and gthread workers: inline bodies hold no registered stream
            begin_shutdown()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
