"""The events that say why a run ended early: its last event when it did not end by itself.

Each is an ``error`` event with ``{"type": ..., "message": ...}``, encoded without its ``id:``
line (the store gives it the run's next seq), so every follower, and every client that
reconnects later, learns why the run stopped instead of taking it for a finished one.
"""

from __future__ import annotations

from ..events import Event

__all__ = ["cancelled_event", "lost_event", "store_unavailable_event", "vanished_event"]


def _error(kind: str, message: str) -> bytes:
    return Event(data={"type": kind, "message": message}, event="error").encode()


def cancelled_event(why: str) -> bytes:
    """The run was cancelled: ``why`` says by what (a DELETE, the reconnect window)."""
    return _error("RunCancelled", f"the run was cancelled ({why})")


def lost_event() -> bytes:
    """The worker producing the run stopped renewing its lease (killed, or cut off)."""
    return _error("ProducerLost", "the worker producing this run was lost; the run ended")


def store_unavailable_event(seconds: float) -> bytes:
    """The run store did not answer for longer than the outage bound."""
    return _error(
        "StoreUnavailable", f"the run store was unavailable for more than {seconds:g} s; the run ended"
    )


def vanished_event() -> bytes:
    """The store no longer has a run this response was following (it expired, or the store
    lost its data)."""
    return _error("RunVanished", "the run store no longer has this run; its end is unknown")
