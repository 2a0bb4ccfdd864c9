"""Exceptions of flask-sse-run, all under one base class."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "RegistrationError",
    "RequestError",
    "SSERunError",
    "UnreadableBody",
    "UpstreamError",
]


class SSERunError(Exception):
    """Base class of every exception this package raises on purpose."""


class ConfigurationError(SSERunError, ValueError):
    """An ``SSE_RUN_*`` setting is invalid; raised by ``init_app`` at start-up."""


class RegistrationError(SSERunError, TypeError):
    """A function cannot be served (bad name or signature); raised when it is registered."""


class RequestError(SSERunError):
    """A request is rejected before streaming starts; becomes a JSON error response.

    ``status`` is the HTTP status, ``message`` the ``error`` string of the body and
    ``detail`` an optional list of ``{"loc": [...], "msg": ...}`` problems.
    """

    def __init__(
        self,
        status: int,
        message: str,
        detail: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        body: dict[str, Any] = {"error": self.message}
        if self.detail is not None:
            body["detail"] = self.detail
        return body


class UnreadableBody(RequestError):
    """The request body could not be read: broken chunked framing, or the client stopped mid-body.

    A 400 for the client; ``reason`` (the server's exception type, never the client's bytes) is
    for the one log line the view writes.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(400, "the request body could not be read: malformed framing or an incomplete body")
        self.reason = reason


class UpstreamError(RequestError):
    """An upstream server whose stream is relayed refused, failed, went silent or was unreachable.

    Raised by :mod:`flask_sse_run.relay`. Before the response starts it is a
    :class:`RequestError`: a JSON error with ``status`` (the upstream's own 4xx, or 502, 503,
    504). Raised inside a stream, the ``error`` event shows its message and status even
    without ``SSE_RUN_EXPOSE_ERRORS``: the message is made by the relay from the upstream's
    status and error text (one line, at most 300 characters), never from this server's own
    state, so it is safe to show. ``upstream_status`` is the upstream's HTTP status, if any.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        upstream_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers=headers)
        self.upstream_status = upstream_status
