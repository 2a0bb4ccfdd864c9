"""Run ids and event ids: ``id: <run_id>:<seq>``, what a client resumes from.

A run id is 128 random bits from the OS (``secrets``), as 32 hex digits: unguessable, since
knowing one is enough to read a run's events where auth is off. It is never the client's
``X-Request-ID``. Sequence numbers start at 1; ``<run_id>:0`` means "from the start".
"""

from __future__ import annotations

import re
import secrets

__all__ = ["event_id", "is_run_id", "new_run_id", "parse_event_id", "parse_position"]

_RUN_ID = re.compile(r"[0-9a-f]{32}\Z")
_SEQ = re.compile(r"(?:0|[1-9][0-9]{0,17})\Z")


def new_run_id() -> str:
    """A fresh run id."""
    return secrets.token_hex(16)


def event_id(run_id: str, seq: int) -> str:
    """The SSE ``id`` of event ``seq`` of run ``run_id``."""
    return f"{run_id}:{seq}"


def is_run_id(text: str) -> bool:
    """Whether ``text`` has the shape of a run id."""
    return bool(_RUN_ID.match(text))


def parse_event_id(text: str) -> tuple[str, int] | None:
    """``(run_id, seq)`` from a ``Last-Event-ID`` this server gave, or ``None``."""
    run_id, sep, seq = text.strip().partition(":")
    if not sep or not _RUN_ID.match(run_id) or not _SEQ.match(seq):
        return None
    return run_id, int(seq)


def parse_position(text: str, run_id: str) -> int | None:
    """The seq in ``text``: a bare number (``?last_event_id=12``) or a whole event id of
    ``run_id``; ``None`` if it is neither."""
    text = text.strip()
    if _SEQ.match(text):
        return int(text)
    parsed = parse_event_id(text)
    if parsed is None or parsed[0] != run_id:
        return None
    return parsed[1]
