"""Many SSE subscribers in one process, for ``bench_channels``: raw sockets on one epoll loop.

A :class:`Subscribers` is a child process (``spawn``) that holds thousands of streams and reads
them all on one thread. It parses nothing: after the HTTP head it counts the ``data:`` lines of
each connection (each event of both libraries has exactly one, and chunk framing or ``: ping``
comments have none), and while recording it notes, for each read that brought events, the
count before it, how many it brought and when (``time.monotonic()``, the same clock in every
process of the machine). The k-th event a connection reads after :meth:`Subscribers.record` is
the k-th event published after it (one publisher, one ordered channel), so the parent knows
when each subscriber got each event without any id or timestamp being parsed here.
"""

from __future__ import annotations

import errno
import multiprocessing
import resource
import select
import socket
import time
from typing import Any

__all__ = ["MARKER", "Subscribers", "deliveries"]

_CONNECT_BATCH = 500
_MARK = b"data:"
#: What the publisher's last event of a flood holds (:meth:`Subscribers.status`'s ``marked``).
MARKER = b"bench-marker"
_CARRY = len(MARKER) - 1


def _serve(control: Any) -> None:
    """The child's loop: connections, reads, and the parent's commands on ``control``."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    poller = select.epoll()
    control_fd = control.fileno()
    poller.register(control_fd, select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    slot: dict[int, int] = {}  # fd -> index of the connection
    heads: list[bytes | None] = []  # the head read so far; None once it is complete
    statuses: list[int] = []
    primed = bytearray()  # 1 once a byte of the body came (flask-sse-run's first id block)
    marked = bytearray()  # 1 once MARKER came, since the last record
    alive = bytearray()
    counts: list[int] = []
    carry: list[bytes] = []
    base: list[int] = []
    records: list[tuple[int, int, float]] = []
    recording = False
    closed = errors = 0
    to_open: list[tuple[str, int, bytes]] = []
    unsent: dict[int, bytes] = {}
    recv = socket.socket.recv
    monotonic = time.monotonic

    def status() -> dict[str, Any]:
        behind = [counts[i] - base[i] for i in range(len(counts)) if alive[i]] if recording else []
        return {
            "opened": len(counts), "pending": len(to_open), "heads": sum(h is None for h in heads),
            "ok": statuses.count(200), "primed": sum(primed), "marked": sum(marked), "closed": closed,
            "errors": errors,
            "least": min(behind, default=0), "most": max(behind, default=0),
        }  # fmt: skip

    def drop(fd: int) -> None:
        nonlocal closed
        poller.unregister(fd)
        socks.pop(fd).close()
        alive[slot[fd]] = 0
        unsent.pop(fd, None)
        closed += 1

    while True:
        if to_open:
            batch, to_open[:] = to_open[:_CONNECT_BATCH], to_open[_CONNECT_BATCH:]
            for host, port, request in batch:
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((host, port))
                fd = sock.fileno()
                socks[fd], slot[fd], unsent[fd] = sock, len(counts), request
                heads.append(b"")
                statuses.append(0)
                primed.append(0)
                marked.append(0)
                alive.append(1)
                counts.append(0)
                carry.append(b"")
                base.append(0)
                poller.register(fd, select.EPOLLOUT)
        for fd, mask in poller.poll(0.05 if to_open else 0.5):
            if fd == control_fd:
                command, *args = control.recv()
                if command == "connect":
                    host, port, request, count = args
                    to_open.extend([(host, port, request)] * count)
                    control.send(None)
                elif command == "status":
                    control.send(status())
                elif command == "record":
                    base[:] = counts
                    marked[:] = bytes(len(marked))
                    records = []
                    recording = True
                    control.send(None)
                elif command == "collect":
                    control.send(records)
                    records, recording = [], False
                elif command == "close":
                    for each in list(socks):
                        drop(each)
                    control.send(status())
                    return
                continue
            index = slot[fd]
            sock = socks[fd]
            if mask & select.EPOLLOUT:
                try:
                    sent = sock.send(unsent[fd])
                except OSError:
                    errors += 1
                    drop(fd)
                    continue
                rest = unsent[fd][sent:]
                if rest:
                    unsent[fd] = rest
                else:
                    del unsent[fd]
                    poller.modify(fd, select.EPOLLIN)
                continue
            try:
                data = recv(sock, 262144)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                errors += 1
                data = b""
            if not data:
                drop(fd)
                continue
            now = monotonic()
            head = heads[index]
            if head is not None:
                head += data
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    heads[index] = head
                    continue
                heads[index] = None
                statuses[index] = int(head.split(b" ", 2)[1])
                data = head[end + 4 :]
                if not data:
                    continue
            primed[index] = 1
            held = carry[index]  # the end of the last read: a mark or marker cut in two
            text = held + data
            found = text.count(_MARK) - held.count(_MARK)
            carry[index] = text[-_CARRY:]
            if not marked[index] and MARKER in text:
                marked[index] = 1
            if found:
                before = counts[index]
                counts[index] = before + found
                if recording:
                    records.append((before - base[index], found, now))


class Subscribers:
    """A child process holding ``connect``-ed streams; see the module docstring."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def _ask(self, *command: Any) -> Any:
        self._control.send(command)
        return self._control.recv()

    def connect(self, port: int, request: bytes, count: int, host: str = "127.0.0.1") -> None:
        """Open ``count`` more streams, each sending ``request`` (opened in batches of 500)."""
        self._ask("connect", host, port, request, count)

    def status(self) -> dict[str, Any]:
        """``opened``, ``pending`` (not yet opened), ``heads`` (complete), ``ok`` (status 200),
        ``primed`` (a byte of body came), ``marked`` (:data:`MARKER` came since the last
        :meth:`record`), ``closed``, ``errors``; while recording, ``least``
        and ``most``: the fewest and most events one open connection has read since."""
        return self._ask("status")  # type: ignore[no-any-return]

    def record(self) -> None:
        """Count events from now on (the next event read is event 0 of each connection)."""
        self._ask("record")

    def collect(self) -> list[tuple[int, int, float]]:
        """What was recorded: ``(first event, how many, when)`` per read, in time order."""
        return self._ask("collect")  # type: ignore[no-any-return]

    def close(self) -> dict[str, Any]:
        if not self.process.is_alive():
            return {}
        try:
            found = self._ask("close")
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        return found  # type: ignore[no-any-return]


def deliveries(
    records: list[list[tuple[int, int, float]]], published: list[float]
) -> tuple[list[float], list[float], float]:
    """From the records of every process and the publish times: the latency of each event to
    its last subscriber (events nobody read are left out), the latency of every delivery, and
    when the last read was (0.0 if none)."""
    events = len(published)
    last = [0.0] * events
    every: list[float] = []
    for found in records:
        for first, count, when in found:
            for seq in range(first, min(first + count, events)):
                if when > last[seq]:
                    last[seq] = when
                every.append(when - published[seq])
    latest = max(last, default=0.0)
    return [last[seq] - published[seq] for seq in range(events) if last[seq]], every, latest
