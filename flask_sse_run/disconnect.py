"""Notice at once when a client goes away, without waiting for the next write (gevent only).

Once the request body has been read, what can make a streaming client's socket readable is its
FIN or RST, and now and then a byte it should not have sent (a stray ``\\r\\n``, a pipelined next
request). A gevent read watcher on the connection's file descriptor fires then; peeking tells
EOF (the client left) from data. Data is left in place for the server (a pipelined request is
answered after the stream) and the watch goes on: the socket now stays readable, so instead of
the read watcher a timer polls for the peer's hang-up (``POLLRDHUP``, ``POLLHUP``, ``POLLERR``,
which the kernel reports behind unread data too) every ``HANGUP_POLL`` seconds.

A client that half-closes its sending side but still reads would look like a disconnect; HTTP
clients do not do that while waiting for a response.

:func:`interrupt_on_disconnect` applies the same watch to code that runs before a response
exists (a plain function, a generator collected for a JSON client): the client leaving
interrupts it where it waits.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gevent import GreenletExit

from .cancellation import CancelToken

__all__ = [
    "HANGUP_POLL",
    "Interrupted",
    "interrupt_on_disconnect",
    "limit_unacknowledged",
    "watch_for_disconnect",
]

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
#: How often a socket with unread data is polled for the peer's hang-up (seconds).
HANGUP_POLL = 0.1
# Linux reports a FIN behind unread data as POLLRDHUP; elsewhere only POLLHUP/POLLERR (an RST).
_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


class Interrupted(GreenletExit):  # type: ignore[misc]
    """Thrown into a blocked generator when its client leaves or the worker shuts down.

    A ``GreenletExit``, so that ``except Exception`` in user code does not swallow it. Not a
    ``GeneratorExit``: the idiom ``except GeneratorExit: return`` in a helper generator would
    end the helper quietly and let its caller run on (measured: a disconnected stream ran its
    next blocking second). Cleanup belongs in ``finally``, which runs either way.
    """


class _Watch:
    """A read watcher, then (once data sits unread on the socket) a hang-up poll."""

    __slots__ = ("_fd", "_io", "_loop", "_on_disconnect", "_raw", "_timer")

    def __init__(self, loop: Any, raw: Any, fd: int, on_disconnect: Callable[[], None]) -> None:
        self._loop = loop
        self._raw = raw
        self._fd = fd
        self._on_disconnect = on_disconnect
        self._timer: Any = None
        self._io = loop.io(fd, 1)  # 1: readable
        self._io.start(self._readable)

    def close(self) -> None:
        self._io.close()
        if self._timer is not None:
            self._timer.close()

    def _readable(self) -> None:
        try:
            data = self._raw.recv(1, _PEEK)
        except BlockingIOError:
            return  # a spurious wake-up
        except OSError:
            data = b""  # reset by the peer
        self._io.stop()
        if not data:
            self._on_disconnect()
            return
        # Data the client should not have sent: leave it for the server and keep watching.
        self._timer = self._loop.timer(HANGUP_POLL, HANGUP_POLL)
        self._timer.start(self._poll_hangup)

    def _poll_hangup(self) -> None:
        poller = _original_poll()
        poller.register(self._fd, _HANGUP)
        if poller.poll(0):
            self._timer.stop()
            self._on_disconnect()


def _original_poll() -> Any:
    # gevent's patched poll would wait cooperatively, which a hub callback must never do; with
    # a zero timeout the OS's own never blocks.
    from gevent import monkey

    return monkey.get_original("select", "poll")()


def watch_for_disconnect(sock: Any, on_disconnect: Callable[[], None]) -> _Watch | None:
    """Start watching ``sock`` (gunicorn's ``environ["gunicorn.socket"]``) for the client leaving.

    Returns the watch (call ``close()`` on it before the connection is reused), or ``None``
    when the socket cannot be watched. ``on_disconnect`` runs in the gevent hub, at most once:
    it must not block or switch.
    """
    # gevent's socket object waits (switches greenlets) on EAGAIN, which the hub's own callback
    # must never do: peek with the OS-level socket underneath it.
    raw = getattr(sock, "_sock", sock)
    try:
        fd = raw.fileno()
    except (AttributeError, OSError):
        return None
    if fd < 0:
        return None
    from gevent import get_hub

    return _Watch(get_hub().loop, raw, fd, on_disconnect)


def limit_unacknowledged(sock: Any, seconds: float) -> None:
    """Make the kernel end the connection when data sent on it goes unacknowledged for ``seconds``.

    A client whose network vanished (Wi-Fi lost, a NAT entry dropped) sends no FIN or RST: the
    read watch sees nothing and writes succeed into the send buffer, and Linux retransmits for
    about 15 minutes. ``TCP_USER_TIMEOUT`` ends it after ``seconds``; the socket then turns
    readable with an error, which the read watch reports as a disconnect. Linux only; elsewhere
    nothing is done (the blocked-write deadline still applies).
    """
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is None:
        return
    raw = getattr(sock, "_sock", sock)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds * 1000)))
    except (AttributeError, OSError):
        pass  # not a TCP socket (a Unix socket behind a proxy): nothing to bound


@contextmanager
def interrupt_on_disconnect(sock: Any, token: CancelToken) -> Iterator[None]:
    """While the block runs in this greenlet, a client that leaves interrupts it.

    ``token`` is cancelled (``"disconnect"``) and :class:`Interrupted` is thrown into the
    greenlet where it waits (a cooperative sleep, socket read, ``iterate_in_thread``); the
    block's ``finally`` clauses run and the exception leaves the ``with``. Code that never
    waits cannot be interrupted, but sees :func:`~flask_sse_run.disconnected`. The watch is
    armed at the hub's first turn: a block that never waits costs one callback.
    """
    from gevent import get_hub, getcurrent

    greenlet = getcurrent()
    loop = get_hub().loop
    active = True
    watch: _Watch | None = None

    def arm() -> None:
        nonlocal watch
        if active:
            watch = watch_for_disconnect(sock, disconnected)

    def disconnected() -> None:
        loop.run_callback(interrupt)  # scheduled first: a token callback that raises can't stop it
        token.cancel("disconnect")

    def interrupt() -> None:
        # Only while the block still runs: past it, this greenlet serves something else.
        if active and not greenlet.dead:
            greenlet.throw(Interrupted("disconnect"))

    loop.run_callback(arm)
    try:
        yield
    finally:
        active = False
        if watch is not None:
            watch.close()
