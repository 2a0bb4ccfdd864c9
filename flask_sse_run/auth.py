"""Bearer-token authentication: static tokens or JWTs, checked before a request body is read.

Off unless ``SSE_RUN_AUTH_TOKENS`` or ``SSE_RUN_JWT_KEY`` is set; both may be set, and a token
is let in if it is one of the static tokens or a valid JWT. Deliberate choices:

* Only the ``Authorization: Bearer`` header is read, never a query parameter: URLs end up in
  access logs and browser histories.
* Static tokens are compared by their SHA-256 digests with :func:`hmac.compare_digest`, against
  every configured token: the time taken says neither which token nearly matched nor how long
  the tokens are.
* The JWT algorithm allow-list comes from configuration only, never from the token. ``none`` and
  lists that mix HMAC with public-key algorithms (the "algorithm confusion" attack, where a
  public key is used as an HMAC secret) are refused at start-up, as are HMAC keys shorter than
  the hash (RFC 7518 section 3.2). ``exp`` is required; ``aud`` is required and checked when
  ``SSE_RUN_JWT_AUDIENCE`` is set.
* A refusal is logged with the request id and the reason (an exception's class name), never the
  token or a claim; error messages never echo the token either.
* Failures are ``401`` with ``WWW-Authenticate: Bearer`` (RFC 6750): without an ``error``
  attribute when no bearer token was sent, with ``error="invalid_token"`` when one was refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
from flask import current_app, g

from .errors import RequestError

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "MIN_TOKEN_LENGTH",
    "Authenticator",
    "authenticate",
    "check_jwt_settings",
    "check_static_tokens",
    "jwt_subject",
]

#: Shorter static tokens are refused at start-up: they could be guessed.
MIN_TOKEN_LENGTH = 16
# RFC 6750 section 2.1: the characters a bearer token may hold.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
_BEARER = re.compile(r"Bearer[ ]+(\S*)\s*\Z", re.IGNORECASE)


def check_static_tokens(tokens: Sequence[str]) -> None:
    """Raise :class:`ValueError` unless ``tokens`` is a usable ``SSE_RUN_AUTH_TOKENS`` list.

    Messages name a token by its position, never by its value.
    """
    if not tokens:
        raise ValueError("an empty list would let nobody in; leave it unset (None) to turn auth off")
    for index, token in enumerate(tokens):
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token {index} is shorter than {MIN_TOKEN_LENGTH} characters")
        if not _B64TOKEN.match(token):
            raise ValueError(
                f"token {index} holds characters a bearer token cannot (RFC 6750: letters, digits, "
                "'-._~+/' and trailing '=')"
            )


def check_jwt_settings(key: str, algorithms: Sequence[str]) -> None:
    """Raise :class:`ValueError` unless ``key`` verifies tokens signed with every one of ``algorithms``.

    Refuses ``none``, algorithms PyJWT cannot use here (public-key ones need the
    ``cryptography`` package), a mix of HMAC and public-key algorithms, a private key, and HMAC
    keys shorter than the hash. Messages never include the key.
    """
    if not algorithms:
        raise ValueError("SSE_RUN_JWT_ALGORITHMS must list at least one algorithm")
    available = jwt.algorithms.get_default_algorithms()
    for name in algorithms:
        if name.lower() == "none":
            raise ValueError("SSE_RUN_JWT_ALGORITHMS must not hold 'none': it accepts unsigned tokens")
        if name not in available:
            raise ValueError(
                f"SSE_RUN_JWT_ALGORITHMS: {name!r} is not available (RS*, PS*, ES* and EdDSA need "
                "the cryptography package)"
            )
    if len({name.startswith("HS") for name in algorithms}) > 1:
        raise ValueError(
            "SSE_RUN_JWT_ALGORITHMS mixes HMAC (HS*) and public-key algorithms; one key cannot be both"
        )
    if "PRIVATE KEY" in key:
        raise ValueError("SSE_RUN_JWT_KEY is a private key; give the public key, the server only verifies")
    for name in algorithms:
        algorithm = available[name]
        try:
            prepared = algorithm.prepare_key(key)
        except Exception as exc:  # PyJWT and cryptography raise several kinds
            raise ValueError(f"SSE_RUN_JWT_KEY is not a key for {name} ({type(exc).__name__})") from None
        too_short = algorithm.check_key_length(prepared)
        if too_short:
            raise ValueError(f"SSE_RUN_JWT_KEY is too weak for {name}: {too_short}")


class _Refused(Exception):
    """A request's credentials were refused; ``reason`` is for the log only."""

    def __init__(self, message: str, reason: str, *, invalid_token: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.invalid_token = invalid_token


@dataclass(frozen=True)
class Authenticator:
    """Checks an ``Authorization`` header against the configured tokens and JWT key."""

    token_digests: tuple[bytes, ...] = ()
    jwt_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator | None:
        """The authenticator for ``settings``, or ``None`` when auth is off."""
        if not settings.auth_enabled:
            return None
        return cls(
            token_digests=tuple(_digest(token) for token in settings.auth_tokens or ()),
            jwt_key=settings.jwt_key,
            jwt_algorithms=settings.jwt_algorithms,
            jwt_audience=settings.jwt_audience,
        )

    def verify(self, authorization: str | None) -> dict[str, Any] | None:
        """Return the JWT's claims (``None`` for a static token) or raise ``_Refused``."""
        if not authorization or not authorization.lower().startswith("bearer"):
            raise _Refused(
                "authentication required: send 'Authorization: Bearer <token>'",
                "no bearer token",
                invalid_token=False,
            )
        match = _BEARER.match(authorization)
        if match is None or not _B64TOKEN.match(match.group(1)):
            raise _Refused("the bearer token is malformed", "malformed")
        token = match.group(1)
        if self._is_static_token(token):
            return None
        if self.jwt_key is None:
            raise _Refused("the bearer token is invalid", "unknown static token")
        return self._verify_jwt(token, self.jwt_key)

    def _is_static_token(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        for digest in self.token_digests:  # no early exit: every token costs the same
            matched |= hmac.compare_digest(digest, presented)
        return matched

    def _verify_jwt(self, token: str, key: str) -> dict[str, Any]:
        required = ["exp", "aud"] if self.jwt_audience is not None else ["exp"]
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self.jwt_algorithms),
                audience=self.jwt_audience,
                options={"require": required, "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise _Refused("the bearer token has expired", "ExpiredSignatureError") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:  # fail closed on any odd token
            raise _Refused("the bearer token is invalid", type(exc).__name__) from None
        return claims


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def authenticate(authenticator: Authenticator | None, authorization: str | None, rid: str) -> None:
    """Let the request in or raise :class:`RequestError` (401, ``WWW-Authenticate: Bearer``).

    Does nothing when ``authenticator`` is ``None`` (auth off). Stores the JWT's claims in
    ``flask.g.sse_run_claims`` (``None`` for a static token) for the function to read.
    """
    if authenticator is None:
        return
    try:
        g.sse_run_claims = authenticator.verify(authorization)
    except _Refused as refused:
        current_app.logger.info("request %s: credentials refused (%s)", rid, refused.reason)
        challenge = "Bearer"
        if refused.invalid_token:
            challenge += f' error="invalid_token", error_description="{refused.message}"'
        raise RequestError(401, refused.message, headers={"WWW-Authenticate": challenge}) from None


def jwt_subject() -> str | None:
    """The ``sub`` of this request's JWT (as :func:`authenticate` stored its claims), or
    ``None``: no JWT, a static token, or auth off."""
    claims = g.get("sse_run_claims")
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return None if sub is None else str(sub)
