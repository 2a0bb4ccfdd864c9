"""What a request asks of the response: a stream or one JSON document, and its request id.

Both are read from headers before the body, so a refusal (406) costs no body read.
"""

from __future__ import annotations

import os
import random
import re

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header
from werkzeug.wrappers import Request

from .errors import RequestError

__all__ = ["JSON", "STREAM", "request_id", "wants_stream"]

STREAM = "text/event-stream"
JSON = "application/json"
# The Accept values curl, EventSource and most clients send: answered without parsing.
_STREAM_ACCEPTS = frozenset({"*/*", STREAM, f"{STREAM}, */*"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
# Request ids' own generator: an app that seeds ``random`` (for reproducible sampling, say)
# must not make its request ids repeat. Reseeded from the OS in each forked worker.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)
# The version (4) and variant (RFC 4122) bits of a random UUID, set on 128 random bits.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def wants_stream(header: str | None, req: Request | None = None) -> bool:
    """Whether to answer with an event stream (True) or one JSON document (False).

    ``header`` is the raw Accept header (``req.accept_mimetypes`` is parsed only when it is not
    one of the common exact values). Each type's quality is that of the most specific range
    matching it (RFC 9110 12.5.1: ``text/event-stream;q=0, */*`` refuses streams). The stream
    wins ties: a client that takes ``text/event-stream`` at least as much as ``application/json``
    (axios's ``application/json, text/plain, */*`` does, through ``*/*``) gets a stream; JSON
    only when it ranks JSON strictly higher. Raises :class:`RequestError` (406) when it takes
    neither.
    """
    if not header or header in _STREAM_ACCEPTS:
        return True
    if header == JSON:
        return False
    accept = req.accept_mimetypes if req is not None else parse_accept_header(header, MIMEAccept)
    stream_q, json_q = _quality(accept, STREAM), _quality(accept, JSON)
    if not stream_q and not json_q:
        raise RequestError(406, f"this endpoint answers {STREAM} or {JSON}")
    return stream_q >= json_q


def _quality(accept: MIMEAccept, mimetype: str) -> float:
    """The quality ``accept`` gives ``mimetype``: the q of its most specific matching range.

    Werkzeug's ``quality()`` takes the first match in order of q, so a ``*/*`` of q=1 would
    override an explicit ``text/event-stream;q=0``.
    """
    kind = mimetype.partition("/")[0]
    best, quality = -1, 0.0
    for value, q in accept:
        value = value.partition(";")[0].strip().lower()
        if value == mimetype:
            specificity = 2
        elif value == f"{kind}/*":
            specificity = 1
        elif value in ("*/*", "*"):
            specificity = 0
        else:
            continue
        if specificity > best:
            best, quality = specificity, q
    return quality


def request_id(header: str | None) -> str:
    """The client's ``X-Request-ID`` if it is short and plain, else a new UUID."""
    if header and _REQUEST_ID.match(header):
        return header
    # A version 4 UUID's hex from a seeded generator rather than os.urandom: an id needs to be
    # unique, not secret, and the system call was, measured in the server, most of its cost.
    return "%032x" % (_ids.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
