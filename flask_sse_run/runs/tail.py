"""A response that follows a run: every held event after a position, then the live ones, then the end.

Replay and live reading are one loop over the store (read after the last seq sent, else wait),
so there is no gap and no duplicate at the seam. Events come out as they were stored, already
encoded with their ids, a whole batch per item (the stream writes each batch at once).

A position older than what the store still holds gets one ``missed`` event first, whose data
says how many events were dropped, never a silent gap.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..events import Encoded, Event
from .ids import event_id
from .store import RunStore, StoreUnavailable

if TYPE_CHECKING:
    from ..stream_record import StreamRecord

__all__ = ["MISSED_EVENT", "READ_LIMIT", "missed_event", "tail"]

#: The name of the event that reports dropped events.
MISSED_EVENT = "missed"
#: Most events read from the store at once.
READ_LIMIT = 1024
#: A wait on the store is renewed this often (seconds): a safety net for a missed wake-up.
WAIT_TIMEOUT = 30.0


def missed_event(run_id: str, last_missed: int, count: int) -> bytes:
    """``event: missed`` with ``{"missed": count}``; its id is the last event missed, so a client
    that reconnects after it resumes with the first one held."""
    return Event(data={"missed": count}, event=MISSED_EVENT, id=event_id(run_id, last_missed)).encode()


def tail(store: RunStore, run_id: str, after: int, record: StreamRecord | None = None) -> Iterator[Encoded]:
    """Yield the run's encoded events after seq ``after``, live, until the run has ended.

    The client counts as attached to the run (its reconnect window does not run) from the
    first step until the generator is closed. ``record`` learns how the run ended.
    """
    attached = False
    try:
        store.attach(run_id)
        attached = True
        position = after
        while True:
            found = store.read(run_id, position, READ_LIMIT)
            if found is None:  # expired meanwhile
                return
            if found.missed:
                position += found.missed
                yield Encoded(missed_event(run_id, position, found.missed))
            if found.events:
                position = found.events[-1][0]
                yield Encoded(b"".join([data for _, data in found.events]))
                continue
            if found.ended:
                if record is not None:
                    record.outcome = found.status
                return
            store.wait(run_id, position, WAIT_TIMEOUT, found.mark)
    except StoreUnavailable as exc:  # the store went away mid-stream: say so, and end cleanly
        if record is not None:
            record.outcome = "error"
        failure = {"type": "StoreUnavailable", "message": exc.message}
        yield Encoded(Event(data=failure, event="error").encode())
    finally:
        if attached:
            try:
                store.detach(run_id)
            except StoreUnavailable:
                pass  # gone: the run's window cannot be kept either way
