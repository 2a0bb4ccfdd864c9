"""One worker's fan-out of channels: one follower per channel, however many clients read it.

A channel's events live in the app's run store (:meth:`~..runs.store.RunStore.publish`), each
already encoded with its ``id:`` line. In a worker, the first client of a channel makes a
:class:`Feed`: one greenlet (or thread) that follows the channel in the store (on Redis, one
subscription of this worker, whose announcements carry the events: no round trip per event),
keeps its newest events in a cache (:data:`CACHE_EVENTS`), and wakes the worker's clients of
the channel. Each client then takes the very bytes the cache holds: an event is encoded once
per worker, by its publisher, and shared by every client.

A client that falls behind the cache (a slow reader, or one that reconnects with an old
``Last-Event-ID``) reads the store itself, and one past the store's history is told how many
events it missed: the worker holds nothing more per client than what it is writing now, so a
client that cannot keep up never grows the worker's memory.

A feed outlives its last client by :data:`LINGER` seconds (a reconnect finds it warm), then
stops following, which on Redis unsubscribes. A store that does not answer is tried again for
the store's outage bound; longer, the feed fails, its clients' streams end with an ``error``
event, and the next client makes a new feed.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

from ..concurrency import gevent_patched, new_event, raw_lock, spawn
from ..runs.store import RunSlice, RunStore, StoreUnavailable
from ..runs.tail import READ_LIMIT, Outage
from .names import channel_run_id

if TYPE_CHECKING:
    from ..metrics import ChannelMetrics

__all__ = ["CACHE_EVENTS", "LINGER", "Feed", "Hub"]

#: Newest events of a channel a worker keeps for its clients (and the bytes they may hold).
CACHE_EVENTS = 1024
CACHE_BYTES = 4 << 20
#: Seconds a feed goes on following after its last client left.
LINGER = 5.0
#: Longest a feed's wait on the store lasts: a safety net for a missed wake-up, and how often
#: it looks whether it still has clients.
FEED_WAIT = 2.5
#: Most seconds between two renewals of a followed channel's TTL (a third of the TTL, if less).
RENEW_EVERY = 60.0
#: Store reads a feed keeps for its clients behind the cache.
SHARED_SLICES = 8


class _SharedRead:
    __slots__ = ("done", "error", "found")

    def __init__(self) -> None:
        self.done = new_event()
        self.found: RunSlice | None = None
        self.error: BaseException | None = None


class Feed:
    """One channel as one worker follows it; clients read it through :meth:`after`."""

    def __init__(self, name: str, store: RunStore) -> None:
        self.name = name
        self.run_id = channel_run_id(name)
        self.store = store
        #: The channel's newest events here, ``(seq, encoded event with its id line)``.
        self.events: deque[tuple[int, bytes]] = deque()
        self.nbytes = 0
        #: The last seq this worker has read of the channel.
        self.last_seq = 0
        #: Why the feed stopped, the data of its clients' ``error`` event (``type``,
        #: ``message``); ``None`` while it runs.
        self.error: dict[str, str] | None = None
        #: How many times the channel started again (expired, and made anew: its seqs start over
        #: at 1), for clients to start over too.
        self.epoch = 0
        self.clients = 0
        self.left_at = 0.0
        self.opened = new_event()
        self.open_failed = False
        # Clients of this channel only wait on `changed`, replaced at every change (one wake-up
        # for all); clients of several channels register a waker of their own.
        self.changed: Any = None
        self.wakers: set[Any] = set()
        self._lock = raw_lock()
        # Store reads of clients behind the cache, shared: one in flight per position, and the
        # last few slices read (clients that fell behind together stand at the same position).
        self._reads: dict[int, _SharedRead] = {}
        self._slices: OrderedDict[int, RunSlice] = OrderedDict()
        # Several events joined into one write, by their first and last seqs: clients behind by
        # the same events (after a burst) share one copy, not one each.
        self._joined: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def after(self, position: int) -> list[tuple[int, bytes]] | None:
        """The cached events after ``position`` (up to :data:`READ_LIMIT`); ``None`` if the
        cache no longer reaches back there (read the store)."""
        with self._lock:
            if position >= self.last_seq:
                return []
            held = self.events
            # Empty, with news: the feed started after the position (or cleared its cache).
            if not held or position < held[0][0] - 1:
                return None
            start = position - held[0][0] + 1
            return list(itertools.islice(held, start, start + READ_LIMIT))

    def read(self, position: int) -> RunSlice | None:
        """The store's events after ``position`` (for a client the cache does not reach): one
        round trip for every client of this worker that asks for the same position meanwhile,
        and the last few slices kept for the ones that ask just after."""
        with self._lock:
            found = self._slices.get(position)
            if found is not None:
                return found
            shared = self._reads.get(position)
            leader = shared is None
            if shared is None:
                shared = self._reads[position] = _SharedRead()
        if not leader:
            shared.done.wait()
            if shared.error is not None:
                raise StoreUnavailable() if isinstance(shared.error, StoreUnavailable) else shared.error
            return shared.found
        try:
            shared.found = self.store.read(self.run_id, position, READ_LIMIT)
        except BaseException as exc:
            shared.error = exc
            raise
        finally:
            with self._lock:
                del self._reads[position]
                if shared.found is not None:
                    self._slices[position] = shared.found
                    while len(self._slices) > SHARED_SLICES:
                        self._slices.popitem(last=False)
            shared.done.set()
        return shared.found

    def joined(self, events: list[tuple[int, bytes]]) -> bytes:
        """``events`` (consecutive, one event per item) as one write, shared by the clients
        that read the same ones."""
        if len(events) == 1:
            return events[0][1]
        key = (events[0][0], events[-1][0])
        with self._lock:
            found = self._joined.get(key)
        if found is None:
            found = b"".join([data for _, data in events])
            with self._lock:
                self._joined[key] = found
                while len(self._joined) > SHARED_SLICES:
                    self._joined.popitem(last=False)
        return found

    def wait(self, position: int, timeout: float) -> None:
        """Block until the feed has an event after ``position``, has failed, or ``timeout``."""
        with self._lock:
            if self.last_seq > position or self.error is not None:
                return
            if self.changed is None:
                self.changed = new_event()
            changed = self.changed
        # No timer per wait under gevent: `changed` is swapped and set under the lock at every
        # change and at a failure, so no wake-up can be missed (Event.wait(timeout) arms a
        # gevent Timeout at each call: 14% of the worker at 2,000 subscribers), and a client
        # that leaves is interrupted where it waits. A thread has no such interruption: it looks
        # again after ``timeout``.
        changed.wait(None if gevent_patched() else timeout)

    def register(self, waker: Any, position: int) -> bool:
        """Set ``waker`` at the next change; ``False`` (not registered) if there is news after
        ``position`` already."""
        with self._lock:
            if self.last_seq > position or self.error is not None:
                return False
            self.wakers.add(waker)
            return True

    def unregister(self, waker: Any) -> None:
        with self._lock:
            self.wakers.discard(waker)

    def _add(self, events: list[tuple[int, bytes]]) -> None:
        with self._lock:
            held = self.events
            held.extend(events)
            self.nbytes += sum(len(data) for _, data in events)
            while len(held) > 1 and (len(held) > CACHE_EVENTS or self.nbytes > CACHE_BYTES):
                self.nbytes -= len(held.popleft()[1])
            self.last_seq = events[-1][0]
        self._wake()

    def _clear(self) -> None:
        # The feed fell behind the store's history (it was cut off from it): the cache must hold
        # consecutive seqs, so it starts again after the gap; clients behind read the store.
        with self._lock:
            self.events.clear()
            self.nbytes = 0

    def _restart(self, last_seq: int) -> None:
        # The channel expired and was made again (its seqs start over): what is cached is of
        # the old one.
        with self._lock:
            self.events.clear()
            self.nbytes = 0
            self.last_seq = last_seq
            self.epoch += 1
            self._slices.clear()
            self._joined.clear()
        self._wake()

    def _fail(self, kind: str, message: str) -> None:
        with self._lock:
            self.error = {"type": kind, "message": message}
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            changed, self.changed = self.changed, None
            wakers, self.wakers = self.wakers, set()
        if changed is not None:
            changed.set()
        for waker in wakers:
            waker.set()


class Hub:
    """The channels one app follows in this process; see the module docstring."""

    def __init__(self, store: RunStore, *, outage: float = 10.0) -> None:
        self.store = store
        self.outage = outage
        self.feeds: dict[str, Feed] = {}
        #: Set by the extension when the app records metrics.
        self.metrics: ChannelMetrics | None = None
        self._lock = raw_lock()

    def join(self, name: str) -> Feed:
        """A client follows channel ``name``: its feed, made and opened if it is the first.
        Raises :class:`~..runs.store.StoreUnavailable` if the store cannot open it."""
        with self._lock:
            feed = self.feeds.get(name)
            new = feed is None or feed.error is not None
            if new:
                if feed is None:
                    self._changed(1)  # else a failed one is replaced, and not dropped later
                feed = self.feeds[name] = Feed(name, self.store)
            assert feed is not None
            feed.clients += 1
        if new:
            try:
                feed.last_seq = self.store.open_channel(feed.run_id)
            except BaseException:  # StoreUnavailable, StoreFull: no feed is left half made
                feed.open_failed = True
                feed.opened.set()
                self._drop(feed)
                raise
            feed.opened.set()
            spawn(lambda: self._follow(feed))
        else:
            feed.opened.wait(self.outage)
            if feed.open_failed or not feed.opened.is_set():
                self.leave(feed)
                raise StoreUnavailable()
        return feed

    def leave(self, feed: Feed) -> None:
        """A client of ``feed`` left (its follower stops :data:`LINGER` seconds after the last)."""
        with self._lock:
            feed.clients -= 1
            if feed.clients <= 0:
                feed.left_at = time.monotonic()

    def _drop(self, feed: Feed) -> None:
        with self._lock:
            if self.feeds.get(feed.name) is feed:
                del self.feeds[feed.name]
                self._changed(-1)

    def _changed(self, by: int) -> None:
        # By steps, not set: every app of the process counts in one gauge.
        if self.metrics is not None:
            self.metrics.feeds.inc(by)

    def _idle(self, feed: Feed) -> bool:
        # Under the hub's lock: a client that joins now finds the feed gone, and makes another.
        with self._lock:
            if feed.clients > 0 or time.monotonic() - feed.left_at < LINGER:
                return False
            if self.feeds.get(feed.name) is feed:
                del self.feeds[feed.name]
                self._changed(-1)
            return True

    def _follow(self, feed: Feed) -> None:
        store, run_id = self.store, feed.run_id
        down = Outage(self.outage)
        position = feed.last_seq
        renewed = time.monotonic()
        renew_every = min(RENEW_EVERY, max(0.25, store.channel_ttl / 3))
        attached = False
        born: str | None = None  # the channel's birth, as its first read says
        try:
            while not self._idle(feed):
                try:
                    if not attached:
                        store.attach(run_id)
                        attached = True
                    if time.monotonic() - renewed >= renew_every:
                        store.open_channel(run_id)  # made again if it was gone: read below
                        renewed = time.monotonic()
                    found = store.read(run_id, position, READ_LIMIT)
                    if found is None:  # expired under us: made again, and read next round
                        store.open_channel(run_id)
                        continue
                    # Made again since it was last read (expired, or a Redis restarted without
                    # its data): its seqs start over, and every event it has now is news.
                    restarted = found.last_seq < position or (born is not None and found.born != born)
                    born = found.born
                    if restarted:
                        position = 0
                        feed._restart(0)
                        continue
                    if not found.events:
                        # No longer than the next renewal: a silent channel must not expire.
                        due = renewed + renew_every - time.monotonic()
                        store.wait(run_id, position, max(0.0, min(FEED_WAIT, due)), found.mark)
                        down.answered()
                        continue
                    down.answered()
                except StoreUnavailable:
                    if down.failed():
                        continue
                    message = f"the run store was unavailable for more than {self.outage:g} s"
                    feed._fail("StoreUnavailable", message)
                    self._drop(feed)
                    return
                if found.missed:
                    feed._clear()
                position = found.events[-1][0]
                feed._add(list(found.events))
        except BaseException as exc:
            # Anything else (a bug, the worker ending): its clients are told, not left waiting
            # on a feed that no longer follows, and the next client makes a new one.
            feed._fail("FeedStopped", f"the channel's feed stopped ({type(exc).__name__})")
            self._drop(feed)
            raise
        finally:
            if attached:
                try:
                    store.detach(run_id)
                except StoreUnavailable:
                    pass  # gone: nothing to undo there
