"""The body of a streaming response: each yielded item goes out as one SSE event.

The body is a plain WSGI iterable of bytes. It never buffers between the generator's yield and
the server's write; an exception in the generator becomes one ``error`` event and a clean end
of the body; closing the body (client gone) closes the generator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .events import Event, encode

__all__ = ["error_event", "sse_body"]


def error_event(exc: BaseException, *, expose: bool, request_id: str) -> bytes:
    """The ``error`` event that ends a stream whose generator raised ``exc``."""
    if expose:
        data = {"type": type(exc).__name__, "message": str(exc)}
    else:
        data = {"type": "InternalError", "message": f"the stream failed (request id {request_id})"}
    return Event(data=data, event="error").encode()


def close_iterator(source: Any) -> None:
    """Close a generator (or any iterator with ``close``) so its ``finally`` blocks run."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


def sse_body(
    source: Iterator[Any],
    *,
    request_id: str,
    logger: logging.Logger,
    expose_errors: bool = False,
    end_event: str | None = None,
) -> Iterator[bytes]:
    """Encode ``source`` as an event stream, one chunk per event."""
    try:
        for item in source:
            yield encode(item)
    except Exception as exc:
        logger.error("stream %s failed", request_id, exc_info=exc)
        yield error_event(exc, expose=expose_errors, request_id=request_id)
        return
    finally:
        close_iterator(source)
    if end_event is not None:
        yield Event(data="", event=end_event).encode()
