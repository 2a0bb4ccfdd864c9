"""A response that follows a run: every held event after a position, then the live ones, then the end.

Replay and live reading are one loop over the store (read after the last seq sent, else wait),
so there is no gap and no duplicate at the seam. Events come out as they were stored, already
encoded with their ids, a whole batch per item (the stream writes each batch at once).

A position older than what the store still holds gets one ``missed`` event first, whose data
says how many events were dropped, never a silent gap.

Nothing ends silently short. A store that does not answer is tried again (the stream's
keep-alive pings go on meanwhile) for up to ``outage`` seconds, and the run goes on from where it
was when it answers; longer, the response ends with an ``error`` event (``StoreUnavailable``).
A run the store no longer has while it was followed ends with an ``error`` event
(``RunVanished``). A run that ended early (cancelled, its producer lost, its store away too
long) has the event that says why as its last event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..concurrency import pause
from ..events import Encoded, Event
from .endings import vanished_event
from .ids import event_id
from .store import RunInfo, RunStore, StoreUnavailable

if TYPE_CHECKING:
    from ..stream_record import StreamRecord

__all__ = ["MISSED_EVENT", "READ_LIMIT", "Outage", "beyond_message", "missed_event", "tail"]

#: The name of the event that reports dropped events.
MISSED_EVENT = "missed"
#: Most events read from the store at once.
READ_LIMIT = 1024
#: A wait on the store is renewed this often (seconds): a safety net for a missed wake-up.
WAIT_TIMEOUT = 30.0
#: Seconds between tries of a store that does not answer: the first, and the most.
RETRY_FIRST, RETRY_MOST = 0.1, 1.0


def missed_event(run_id: str, last_missed: int, count: int) -> bytes:
    """``event: missed`` with ``{"missed": count}``; its id is the last event missed, so a client
    that reconnects after it resumes with the first one held."""
    return Event(data={"missed": count}, event=MISSED_EVENT, id=event_id(run_id, last_missed)).encode()


def beyond_message(last_seq: int) -> str:
    """Why a position past a running run's last event is refused (the client's value is not
    repeated: the run's own position says enough)."""
    return (
        f"Last-Event-ID (or last_event_id) is beyond this run's last event so far (seq {last_seq}); "
        "resume from an id the run sent"
    )


class Outage:
    """How long the store has not answered, and the pause before the next try."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.since: float | None = None
        self.delay = RETRY_FIRST

    def answered(self) -> None:
        self.since, self.delay = None, RETRY_FIRST

    def failed(self) -> bool:
        """Count a failed call; pause and return ``True`` to try again, ``False`` past the bound."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        left = self.bound - (now - self.since)
        if left <= 0:
            return False
        pause(min(self.delay, left))
        self.delay = min(self.delay * 2, RETRY_MOST)
        return True


def tail(
    store: RunStore,
    run_id: str,
    after: int,
    record: StreamRecord | None = None,
    *,
    outage: float = 10.0,
    admit: Callable[[RunInfo | None], bool] | None = None,
) -> Iterator[Encoded]:
    """Yield the run's encoded events after seq ``after``, live, until the run has ended.

    The client counts as attached to the run (its reconnect window does not run) from the
    first step until the generator is closed. ``record`` learns how the run ended. ``admit``:
    a check of the run's state still to make (a reconnect that came while the store was away):
    the response ends with nothing if it says no.
    """
    attached = False
    down = Outage(outage)
    position = after
    try:
        while True:
            try:
                if admit is not None:
                    info = store.get(run_id)
                    if not admit(info):
                        return
                    admit = None
                    assert info is not None  # admitted
                    if info.running and info.last_seq < after:
                        # Waiting would send nothing until the run passed a position it never
                        # gave, then skip to there.
                        if record is not None:
                            record.outcome = "error"
                        failure = {"type": "BadPosition", "message": beyond_message(info.last_seq)}
                        yield Encoded(Event(data=failure, event="error").encode())
                        return
                if not attached:
                    store.attach(run_id)
                    attached = True
                found = store.read(run_id, position, READ_LIMIT)
                if found is not None and not found.events and not found.ended:
                    store.wait(run_id, position, WAIT_TIMEOUT, found.mark)
                    down.answered()
                    continue
                down.answered()
            except StoreUnavailable:
                if down.failed():
                    continue
                raise
            if found is None:  # gone while followed: expired, or the store lost it
                if record is not None:
                    record.outcome = "error"
                yield Encoded(b"id: " + event_id(run_id, position + 1).encode() + b"\n" + vanished_event())
                return
            if found.missed:
                position += found.missed
                yield Encoded(missed_event(run_id, position, found.missed))
            if found.events:
                position = found.events[-1][0]
                yield Encoded(b"".join([data for _, data in found.events]))
                continue
            if record is not None:
                record.outcome = found.status
            return
    except StoreUnavailable:  # away longer than the bound: say so, and end cleanly
        if record is not None:
            record.outcome = "error"
        failure = {
            "type": "StoreUnavailable",
            "message": f"the run store was unavailable for more than {outage:g} s",
        }
        yield Encoded(Event(data=failure, event="error").encode())
    finally:
        if attached:
            try:
                store.detach(run_id)
            except StoreUnavailable:
                pass  # gone: the run's window cannot be kept either way
