"""Publishing on a channel, from anywhere that has the app: a view, a generator, a CLI command,
an RQ or Celery worker process pointed at the same ``SSE_RUN_REDIS_URL``.

The event is encoded once, here, and stored with the channel's next seq; every worker that
follows the channel hears of it (on Redis, by the store's announcement) and hands those bytes
to its clients. With the in-process store a publish reaches the clients of this process only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..events import Event
from .names import MAX_NAME, channel_run_id, is_channel_name

if TYPE_CHECKING:
    from ..registry import State

__all__ = ["publish"]


def publish(state: State, channel: str, data: Any, event: str | None = None) -> str:
    """Publish ``data`` (text, or JSON-able: what a generator may yield) on ``channel``, as an
    event named ``event`` (``None``: a plain ``message``); return its id, ``<channel>:<seq>``.

    Raises :class:`ValueError` for a bad channel name, event name or an event larger than
    ``SSE_RUN_RESUME_MAX_BYTES``, :class:`TypeError` for data JSON cannot encode, and
    :class:`~flask_sse_run.runs.store.StoreUnavailable` when the store cannot be reached.
    """
    if not is_channel_name(channel):
        raise ValueError(f"a channel's name must be 1 to {MAX_NAME} letters, digits or any of _ . : @ -")
    if data is None:
        raise ValueError("publish some data: None sends nothing a client would see")
    body = Event(data=data, event=event).encode()
    most = state.settings.resume_max_bytes
    if len(body) > most:
        raise ValueError(
            f"the event is {len(body)} bytes encoded; a channel takes at most {most}"
            " (SSE_RUN_RESUME_MAX_BYTES)"
        )
    seq = state.runs.store.publish(channel_run_id(channel), f"{channel}:".encode(), body)
    if state.runs.store.pending():
        # The in-process store forgets idle channels through the janitor. Not started where it
        # has nothing to do (Redis): it would end at once, and a thread that ends before
        # ensure_janitor records it is left recorded as the janitor, which then never starts
        # again (no heartbeats: the runs produced here lose their leases).
        state.runs.ensure_janitor()
    metrics = state.runs.channels.metrics
    if metrics is not None:
        metrics.published.inc()
    return f"{channel}:{seq}"
