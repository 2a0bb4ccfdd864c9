"""A TCP proxy on 127.0.0.1 that a test can cut: every open connection closes, both sides, at once.

The listening socket stays, so a client that reconnects by itself (``EventSource``) comes back
through the proxy to the same server. The proxy keeps what each client sent, so a test can read
the requests (their ``Last-Event-ID``) from outside the browser.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["CuttableProxy", "cuttable_proxy"]


class _Pair:
    """One client connection and its own connection to the server."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.sent = bytearray()  # what the client sent, for the test to read
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.upstream):
            # shutdown first: it wakes the other thread blocked in recv on this socket (close
            # alone would not), and the peers see the connection end at once.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class CuttableProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`cut` drops every open connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    @property
    def connections(self) -> int:
        """How many client connections the proxy has taken so far."""
        with self._lock:
            return len(self._pairs)

    def requests(self) -> list[bytes]:
        """What each client connection has sent so far (request lines, headers), in order."""
        with self._lock:
            return [bytes(pair.sent) for pair in self._pairs]

    def cut(self) -> int:
        """Close every open connection, both sides; return how many connections were open."""
        with self._lock:
            pairs = list(self._pairs)
        open_before = sum(1 for pair in pairs if not pair._closed)
        for pair in pairs:
            pair.close()
        return open_before

    def close(self) -> None:
        """Stop listening, cut everything, and wait for the proxy's threads."""
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            self._accepted()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            self._spawn(self._pump, pair, client, upstream, True)
            self._spawn(self._pump, pair, upstream, client, False)

    def _accepted(self) -> None:
        """Called with each connection accepted, before it is passed on (a subclass may hold it)."""

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        # Either side ending (or the cut) ends the pair: HTTP needs no half-closed connections.
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_client:
                    with self._lock:
                        pair.sent += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            pair.close()


@contextmanager
def cuttable_proxy(port: int, host: str = "127.0.0.1") -> Iterator[CuttableProxy]:
    """A :class:`CuttableProxy` to ``host:port``, closed (with its connections) on exit."""
    proxy = CuttableProxy((host, port))
    try:
        yield proxy
    finally:
        proxy.close()
