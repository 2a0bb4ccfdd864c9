"""How long-running work learns that its client has gone.

Each stream owns a :class:`CancelToken`. The runtime cancels it when the client disconnects,
the worker shuts down, or the stream is closed for any other reason. Code running for the
stream, in the generator or in a thread started with :func:`~flask_sse_run.iterate_in_thread`,
reads it through :func:`disconnected` or :func:`current_token`; a GPU loop polls it (a plain
attribute read, safe from any OS thread) and stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .concurrency import raw_lock

__all__ = ["CancelToken", "bind_token", "current_token", "disconnected"]

logger = logging.getLogger(__name__)


class CancelToken:
    """A one-way flag: once cancelled, it stays cancelled.

    ``cancelled`` may be read from any thread. Callbacks registered with :meth:`on_cancel`
    run once, in the thread that calls :meth:`cancel` (for streams: the gevent hub's thread),
    so they must not block.
    """

    __slots__ = ("_callbacks", "_lock", "cancelled", "reason")

    def __init__(self) -> None:
        self.cancelled = False
        self.reason: str | None = None
        self._callbacks: list[Callable[[], object]] = []
        # A lock of the OS: on_cancel may be called from a worker thread while the hub cancels.
        self._lock = raw_lock()

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the token (idempotent) and run the callbacks.

        A callback that raises is logged; the others still run.
        """
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            self.reason = reason
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run_callback(callback)

    def on_cancel(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` when the token is cancelled (at once if it already is)."""
        with self._lock:
            if not self.cancelled:
                self._callbacks.append(callback)
                return
        _run_callback(callback)

    def __repr__(self) -> str:
        return f"<CancelToken {'cancelled: ' + str(self.reason) if self.cancelled else 'active'}>"


def _run_callback(callback: Callable[[], object]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("a cancel callback failed")


_current: ContextVar[CancelToken | None] = ContextVar("flask_sse_run_token", default=None)
#: The variable itself, for the streaming hot path (set and reset around each step).
TOKEN_VAR = _current


def current_token() -> CancelToken | None:
    """The token of the stream this code runs for, or ``None`` outside a stream."""
    return _current.get()


def disconnected() -> bool:
    """Whether the client of the current stream has gone (``False`` outside a stream)."""
    token = _current.get()
    return token is not None and token.cancelled


@contextmanager
def bind_token(token: CancelToken) -> Iterator[CancelToken]:
    """Make ``token`` the current one for the code run inside the block."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)
