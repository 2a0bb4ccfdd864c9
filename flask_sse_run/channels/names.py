"""Channel names and the ids a channel stream gives its events: pure code, no Flask.

A channel's name is what publishers and subscribers agree on (``news``, ``user:42``,
``import.7``): letters, digits and ``_ . : @ -``, at most :data:`MAX_NAME` characters, so that
it is a URL path segment as it is and can stand in an event id without escaping.

An event of a stream of channels has the id ``<name>:<seq>`` for each channel the stream
follows, joined by ``,`` in the order the request named them: ``news:12`` for one channel,
``news:12,user:42:7`` for two. The id says, after each event, how far the stream has read every
one of its channels, so a client that reconnects with it (``Last-Event-ID``) resumes each
channel exactly where it was, whichever channel sent the last event. A seq is split off at the
last ``:``, since names may hold ``:`` themselves.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "CHANNEL_PREFIX",
    "MAX_CHANNELS",
    "MAX_NAME",
    "channel_run_id",
    "format_position",
    "is_channel_name",
    "parse_position",
]

#: The most characters of a channel's name.
MAX_NAME = 200
#: The most channels one stream follows.
MAX_CHANNELS = 32
#: What a channel's run records as its prefix: no function's prefix looks like it, so a channel
#: is never reached through ``/runs/<run_id>``.
CHANNEL_PREFIX = "#channel"

_NAME = re.compile(rf"[A-Za-z0-9_.:@-]{{1,{MAX_NAME}}}\Z")
_SEQ = re.compile(r"(?:0|[1-9][0-9]{0,17})\Z")


def is_channel_name(name: object) -> bool:
    """Whether ``name`` can name a channel."""
    return isinstance(name, str) and bool(_NAME.match(name))


def channel_run_id(name: str) -> str:
    """The id of the run that holds channel ``name``'s events (a run id's shape: 32 hex digits),
    the same in every process, so that every publisher and worker finds one log."""
    return hashlib.sha256(b"channel\0" + name.encode()).hexdigest()[:32]


def format_position(positions: dict[str, int]) -> str:
    """The event id that records ``positions`` (name -> last seq read), in their order."""
    return ",".join([f"{name}:{seq}" for name, seq in positions.items()])


def parse_position(text: str) -> dict[str, int] | None:
    """``{name: seq}`` from an id made by :func:`format_position` (or a client's
    ``last_event_id``), or ``None`` if it is not one."""
    found: dict[str, int] = {}
    for part in text.strip().split(","):
        name, sep, seq = part.rpartition(":")
        if not sep or not is_channel_name(name) or not _SEQ.match(seq) or name in found:
            return None
        found[name] = int(seq)
    return found
