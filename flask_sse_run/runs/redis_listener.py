"""A worker's pub/sub connection to one Redis, or to one node of a Redis Cluster.

The Redis run store (:mod:`.redis_store`) subscribes to a run's channel while a response of
this worker follows the run. A listener owns one pub/sub connection and the greenlet (or thread)
that reads it: it sends the store's (un)subscribe commands, tracks which are confirmed, and
tells the store what it hears. A standalone Redis needs one listener per worker; a cluster with
sharded pub/sub one per primary that owns a followed run's slot, since a node delivers only its
own slots' sharded messages.

The store's lock (``lock``, held only around state, never around I/O) guards what the store
reads of a listener (:attr:`Listener.subscribed`, :attr:`Listener.connection`) together with
its own state: a read's mark is one consistent look at both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..concurrency import new_lock, pause, spawn

__all__ = ["LISTEN_TIMEOUT", "Listener", "Owner", "SlotMoved"]

#: How long the listener waits for a message before it looks whether the store is closed (s).
LISTEN_TIMEOUT = 5.0


class SlotMoved(Exception):
    """A cluster node ended a subscription of ours: the run's slot has moved to another node."""


class Owner(Protocol):
    """What a listener needs of its store."""

    @property
    def closed(self) -> bool:
        """Whether the store is closed: the listener stops."""

    def followed_on(self, listener: Listener) -> list[str]:
        """The runs followed here whose channel this listener carries: subscribed on connect."""

    def heard(self, run_id: str, message: bytes) -> None:
        """An announcement of ``run_id`` arrived, with its message."""

    def confirmed(self, listener: Listener, run_id: str) -> None:
        """``run_id``'s channel is subscribed now, on the listener's current connection (the
        owner adds it to :attr:`Listener.subscribed` if it still follows the run)."""

    def broke(self, listener: Listener, error: BaseException | None) -> None:
        """The connection broke (``error``) or the listener stopped (``None``): what was heard
        through it counts no more."""


class Listener:
    """One pub/sub connection made from ``client`` (``SSUBSCRIBE`` where ``sharded``), read by
    a greenlet started at first use. ``connections`` numbers the connections of every listener
    of the store, so that a mark never outlives its connection."""

    def __init__(
        self,
        owner: Owner,
        client: Any,
        *,
        lock: Any,
        sharded: bool,
        channel: Callable[[str], str],
        run_of: Callable[[bytes], str],
        connections: Iterator[int],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self._owner = owner
        self._lock = lock
        self._client = client
        self._sharded = sharded
        self._channel = channel
        self._run_of = run_of
        self._connections = connections
        self._errors: tuple[type[BaseException], ...] = (*errors, SlotMoved)
        #: The runs whose channel is subscribed on the current connection (its number).
        self.subscribed: set[str] = set()
        self.connection = 0
        # (Un)subscribe commands sent per run and not yet confirmed.
        self._unconfirmed: dict[str, int] = {}
        self._subscriber: Any = None  # the connection in subscribed mode, while there is one
        self._send_lock: Any = None  # around a command sent beside the read; made at first use
        self._listening = False

    def start(self) -> None:
        """Listen, if not already (started again after an error it does not expect)."""
        if not self._listening and not self._owner.closed:
            self._listening = True
            spawn(self._listen)

    def send(self, command: str, run_id: str) -> None:
        """``subscribe`` or ``unsubscribe`` the run's channel; without a connection, nothing:
        the listener subscribes to what is followed when it makes one."""
        # From the greenlet that attaches or detaches: a write beside the listener's read.
        subscriber = self._subscriber
        if subscriber is None:
            return
        with self._lock:
            self._unconfirmed[run_id] = self._unconfirmed.get(run_id, 0) + 1
        try:
            self._write(subscriber, command, [self._channel(run_id)])
        except self._errors:
            pass  # the connection broke: the listener makes a new one, subscribed to what is followed

    def _write(self, subscriber: Any, command: str, channels: list[str]) -> None:
        name = ("S" if self._sharded else "") + command.upper()
        # One writer at a time beside the reader (two commands' bytes must not interleave).
        if self._send_lock is None:
            self._send_lock = new_lock()
        with self._send_lock:
            subscriber.send_command(name, *channels)

    def _listen(self) -> None:
        try:
            self._subscribe_and_listen()
        finally:
            with self._lock:
                self._subscriber = None
                self.subscribed.clear()
            self._listening = False
            self._owner.broke(self, None)

    def _subscribe_and_listen(self) -> None:
        pool = self._client.connection_pool
        while not self._owner.closed:
            subscriber = None
            try:
                # A connection of the pool's, in subscribed mode until closed; read here with
                # redis-py's connection and parser, not its PubSub (whose bookkeeping per
                # message cost a worker more than the message itself).
                subscriber = pool.get_connection()
                with self._lock:
                    self.connection = next(self._connections)
                    self.subscribed.clear()
                    followed = self._owner.followed_on(self)
                    self._unconfirmed = dict.fromkeys(followed, 1)
                    self._subscriber = subscriber
                if followed:
                    self._write(subscriber, "subscribe", [self._channel(run_id) for run_id in followed])
                while not self._owner.closed:
                    if subscriber.can_read(timeout=LISTEN_TIMEOUT):
                        # Under RESP3 (redis-py's default) messages are pushes.
                        self._heard_reply(subscriber.read_response(push_request=True))
            except self._errors as exc:
                with self._lock:
                    self._subscriber = None
                    self.subscribed.clear()  # nothing is heard until subscribed again
                if self._owner.closed:
                    return
                # Redis gone (or, in a cluster, a slot moved): every waiter reads again (and
                # reports it); then subscribe again.
                self._owner.broke(self, exc)
                pause(0.5)
            finally:
                if subscriber is not None:
                    subscriber.disconnect()  # never back in use in subscribed mode
                    pool.release(subscriber)

    def _heard_reply(self, reply: Any) -> None:
        # [kind, channel, data or count], as Redis sends them.
        if not isinstance(reply, list) or len(reply) != 3 or not isinstance(reply[1], bytes):
            return
        kind, channel, data = reply
        run_id = self._run_of(channel)
        if kind in (b"smessage", b"message"):
            self._owner.heard(run_id, data)
        elif kind in (b"ssubscribe", b"subscribe", b"sunsubscribe", b"unsubscribe"):
            # Confirmed in the order sent: once none is pending, the last one sent holds.
            with self._lock:
                left = self._unconfirmed.get(run_id, 1) - 1
                if left > 0:
                    self._unconfirmed[run_id] = left
                    return
                self._unconfirmed.pop(run_id, None)
                if kind in (b"sunsubscribe", b"unsubscribe"):
                    if run_id in self.subscribed:
                        # Not one we asked for: a cluster node drops the sharded subscriptions
                        # of a slot that moved away from it. Connect again, routed anew.
                        raise SlotMoved(run_id)
                    return
            self._owner.confirmed(self, run_id)
