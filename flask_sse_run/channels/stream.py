"""One client's stream of one or more channels: replay after its position, then live events.

The stream starts with the id of where it stands (a block with only an ``id:`` line: per the
SSE spec it sets ``EventSource.lastEventId`` and dispatches nothing), so a client cut before
any event still resumes from where it connected, not from whenever it reconnects.

Then, for each channel in turn, the events after the client's position: from its worker's feed
(:mod:`.hub`), or from the store when the feed's cache does not reach back that far; a position
older than the store's history gets one ``missed`` event that says how many events of which
channel are gone. With one channel the stored bytes go out as they are; with several, each
event's ``id:`` line is replaced by the positions of all of them (:mod:`.names`), so a
reconnect resumes each channel exactly.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from ..concurrency import gevent_patched, new_event
from ..events import Encoded, Event
from ..runs.store import RunSlice, StoreUnavailable
from ..runs.tail import MISSED_EVENT, Outage
from .hub import Feed, Hub
from .names import format_position

if TYPE_CHECKING:
    from ..stream_record import StreamRecord

__all__ = ["ChannelStream"]

#: Longest a client waits without looking again (a safety net for a missed wake-up).
WAIT = 30.0


class ChannelStream:
    """The body of a channel stream: an iterator of encoded events whose ``close`` lets go of
    its feeds, whether it ever started or not."""

    def __init__(
        self,
        hub: Hub,
        feeds: list[Feed],
        positions: dict[str, int],
        record: StreamRecord | None = None,
        *,
        outage: float = 10.0,
        epochs: list[int] | None = None,
    ) -> None:
        self._hub = hub
        self._feeds = feeds
        # The feeds' epochs when ``positions`` were taken (a restart after them resets them).
        epochs = [feed.epoch for feed in feeds] if epochs is None else list(epochs)
        self._iterator = _events(feeds, positions, record, outage, epochs)
        self._left = False

    @classmethod
    def when_store_answers(
        cls,
        hub: Hub,
        names: list[str],
        given: dict[str, int],
        record: StreamRecord | None = None,
        *,
        outage: float = 10.0,
    ) -> ChannelStream:
        """A stream that opens its channels first, waiting up to ``outage`` seconds for a store
        that does not answer (keep-alive pings go on meanwhile): a browser's reconnect, which
        ``EventSource`` would give up for good on a 503. Past the bound it ends with an
        ``error`` event, and the browser tries again."""
        stream = cls(hub, [], {}, record, outage=outage)
        stream._iterator = stream._open_then_follow(names, given, record, outage)
        return stream

    def _open_then_follow(
        self, names: list[str], given: dict[str, int], record: StreamRecord | None, outage: float
    ) -> Generator[Encoded, None, None]:
        down = Outage(outage)
        while True:
            try:
                feeds, positions, epochs = open_feeds(self._hub, names, given)
                break
            except StoreUnavailable:
                if not down.failed():
                    if record is not None:
                        record.outcome = "error"
                    yield Encoded(_unavailable(outage))
                    return
        self._feeds = feeds
        yield from _events(feeds, positions, record, outage, epochs)

    def __iter__(self) -> ChannelStream:
        return self

    def __next__(self) -> Encoded:
        return next(self._iterator)

    def close(self) -> None:
        """End the stream: the client left, or its response ended."""
        try:
            self._iterator.close()
        finally:
            if not self._left:
                self._left = True
                for feed in self._feeds:
                    self._hub.leave(feed)


def open_feeds(
    hub: Hub, names: list[str], given: dict[str, int]
) -> tuple[list[Feed], dict[str, int], list[int]]:
    """Join the feeds of ``names``; return them, where the client starts in each (after its
    position in ``given``, else at the newest event), and their epochs as of then. Raises what
    :meth:`Hub.join` raises (``StoreUnavailable``, ``StoreFull``), the joined feeds let go."""
    feeds: list[Feed] = []
    try:
        for name in names:
            feeds.append(hub.join(name))
        # Before the positions: a channel that starts again from here on is read from its start.
        epochs = [feed.epoch for feed in feeds]
        positions = {feed.name: _start(feed, given.get(feed.name)) for feed in feeds}
    except BaseException:  # StoreUnavailable, StoreFull (a later channel): the others let go
        for feed in feeds:
            hub.leave(feed)
        raise
    return feeds, positions, epochs


def _start(feed: Feed, given: int | None) -> int:
    """Where a client starts: after its ``Last-Event-ID`` position, else at the newest event."""
    if given is None:
        return feed.last_seq
    if given <= feed.last_seq:
        return given
    # Ahead of this worker's feed: an event another worker served, not read here yet; or the
    # channel expired and started again since the client read it (its seqs start over).
    info = feed.store.get(feed.run_id)
    last = 0 if info is None else info.last_seq
    return given if given <= last else 0


def _unavailable(outage: float) -> bytes:
    message = f"the run store was unavailable for more than {outage:g} s"
    return Event(data={"type": "StoreUnavailable", "message": message}, event="error").encode()


def _missed(name: str, count: int, position: str) -> bytes:
    return Event(data={"channel": name, "missed": count}, event=MISSED_EVENT, id=position).encode()


def _read(feed: Feed, position: int, outage: float) -> RunSlice | None:
    # The store, for a client behind the feed's cache: tried again while it is away, as a run's
    # follower does; StoreUnavailable past the bound.
    down = Outage(outage)
    while True:
        try:
            return feed.read(position)
        except StoreUnavailable:
            if not down.failed():
                raise


def _events(
    feeds: list[Feed],
    positions: dict[str, int],
    record: StreamRecord | None,
    outage: float,
    epochs: list[int],
) -> Generator[Encoded, None, None]:
    single = len(feeds) == 1
    yield Encoded(b"id: " + format_position(positions).encode() + b"\n\n")
    try:
        while True:
            sent = False
            for index, feed in enumerate(feeds):
                name = feed.name
                if feed.error is not None:
                    if record is not None:
                        record.outcome = "error"
                    yield Encoded(Event(data=feed.error, event="error").encode())
                    return
                if feed.epoch != epochs[index]:  # the channel started again: its seqs from 1
                    epochs[index] = feed.epoch
                    positions[name] = 0
                position = positions[name]
                events = feed.after(position)
                missed = 0
                if events is None:
                    found = _read(feed, position, outage)
                    if found is None:  # expired meanwhile: the feed starts it again
                        continue
                    missed, events = found.missed, list(found.events)
                    if not missed and not events and found.last_seq < position:
                        # The channel started again since (its seqs from 1): the feed is told
                        # at its next look, and this client starts over with it.
                        continue
                if missed:
                    positions[name] = position + missed
                    yield Encoded(_missed(name, missed, format_position(positions)))
                    sent = True
                if not events:
                    continue
                sent = True
                if single:
                    positions[name] = events[-1][0]
                    yield Encoded(feed.joined(events))
                    continue
                out = []
                for seq, data in events:
                    positions[name] = seq
                    # The stored id line names this channel only: the client needs all of them.
                    out.append(b"id: " + format_position(positions).encode() + data[data.index(b"\n") :])
                yield Encoded(b"".join(out))
            if not sent:
                _wait(feeds, positions)
    except StoreUnavailable:
        if record is not None:
            record.outcome = "error"
        yield Encoded(_unavailable(outage))


def _wait(feeds: list[Feed], positions: dict[str, int]) -> None:
    if len(feeds) == 1:
        feed = feeds[0]
        feed.wait(positions[feed.name], WAIT)
        return
    waker = new_event()
    registered: list[Feed] = []
    try:
        for feed in feeds:
            if not feed.register(waker, positions[feed.name]):
                return  # news already: read again
            registered.append(feed)
        waker.wait(None if gevent_patched() else WAIT)  # see Feed.wait
    finally:
        for feed in registered:
            feed.unregister(waker)
