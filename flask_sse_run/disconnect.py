"""Notice at once when a streaming client goes away, without waiting for the next write.

Once the request body has been read, the only thing a streaming client can make the socket
readable with is its FIN or RST (or, rarely, a pipelined next request). A gevent read watcher
on the connection's file descriptor fires then; peeking tells EOF (the client left) from data.
A client that half-closes its sending side but still reads would look like a disconnect; HTTP
clients do not do that while waiting for a response.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

__all__ = ["watch_for_disconnect"]

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def watch_for_disconnect(sock: Any, on_disconnect: Callable[[], None]) -> Any | None:
    """Start a read watcher on ``sock`` (gunicorn's ``environ["gunicorn.socket"]``).

    Returns the watcher (call ``close()`` on it before the connection is reused), or ``None``
    when the socket cannot be watched. ``on_disconnect`` runs in the gevent hub: it must not
    block or switch.
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

    watcher = get_hub().loop.io(fd, 1)  # 1: readable

    def readable() -> None:
        try:
            data = raw.recv(1, _PEEK)
        except BlockingIOError:
            return  # a spurious wake-up
        except OSError:
            data = b""  # reset by the peer
        watcher.stop()
        if not data:
            on_disconnect()
        # Data means a pipelined request: leave it for the server, stop watching.

    watcher.start(readable)
    return watcher
