"""The ``SSE_RUN_*`` configuration keys, read and validated once in ``init_app``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .auth import check_jwt_settings, check_static_tokens
from .errors import ConfigurationError

__all__ = ["PREFIX", "Settings"]

PREFIX = "SSE_RUN_"


class Settings(BaseModel):
    """Validated settings; each field ``x`` is read from the config key ``SSE_RUN_X``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    #: Largest accepted request body in bytes; larger bodies get 413.
    max_body: int = Field(1 << 20, gt=0)
    #: Seconds of silence after which a ``: ping`` comment is sent; 0 turns keep-alive off.
    keepalive: float = Field(15.0, ge=0)
    #: Name of an empty event sent when a stream finishes normally; ``None`` sends none.
    end_event: str | None = None
    #: Put the exception's type and message in ``error`` events (off: a generic message).
    expose_errors: bool = False
    #: Gzip streams for clients that send ``Accept-Encoding: gzip``.
    gzip: bool = True
    #: Name of the event sent to open streams when the worker shuts down gracefully.
    shutdown_event: str = "shutdown"
    #: Seconds a client may take to send its whole request body (408 after); 0 turns it off.
    body_timeout: float = Field(30.0, ge=0)
    #: Seconds a stream's data may go unacknowledged, or a write may block, before the stream
    #: ends as a disconnect (a client whose network vanished, or that stopped reading); 0: off.
    send_timeout: float = Field(30.0, ge=0)
    #: Static bearer tokens that are let in; ``None`` (and no ``jwt_key``) leaves auth off.
    auth_tokens: tuple[str, ...] | None = Field(None, strict=False)
    #: Key that verifies JWT bearer tokens (an HMAC secret or a PEM public key).
    jwt_key: str | None = None
    #: JWT algorithms accepted; the token's ``alg`` header must be one of them.
    jwt_algorithms: tuple[str, ...] = Field(("HS256",), strict=False)
    #: Audience a JWT's ``aud`` claim must name; ``None`` accepts tokens without ``aud``.
    jwt_audience: str | None = None
    #: Make every function's streams resumable runs (a function's ``resumable=`` wins).
    resumable: bool = False
    #: Seconds a run goes on after its last client left, waiting for a reconnect.
    resume_window: float = Field(30.0, ge=0)
    #: Seconds an ended run's events stay readable.
    resume_ttl: float = Field(60.0, ge=0)
    #: Most events a run holds for reconnects (the oldest go first).
    resume_max_events: int = Field(10_000, gt=0)
    #: Most bytes of events a run holds for reconnects.
    resume_max_bytes: int = Field(1 << 20, gt=0)
    #: Most runs (running, or ended and held for the TTL) one worker holds; 503 beyond.
    max_runs: int = Field(10_000, gt=0)
    #: Most bytes of events one worker's runs hold together (the in-process store): ended runs
    #: make room first, oldest first, before their TTL; a new run that finds no room for
    #: ``resume_max_bytes`` gets 503.
    max_bytes: int = Field(256 << 20, gt=0)
    #: Most events a channel keeps for clients that reconnect (its history; the oldest go first).
    channel_history: int = Field(1000, gt=0, le=1_000_000)
    #: Seconds a channel's history is kept after its last publish, once no client follows it.
    channel_history_ttl: float = Field(600.0, gt=0)
    #: Redis URL (``redis://``, ``rediss://``, ``unix://``) of the run store shared by every
    #: worker and replica; ``None``: each worker keeps its own runs in memory.
    redis_url: str | None = None
    #: Prefix of every Redis key the run store writes (several apps can share one Redis).
    redis_prefix: str = Field("sse-run:", min_length=1)
    #: ``SSE_RUN_REDIS_URL`` names a node of a Redis Cluster (any one; the others are learnt
    #: from it): runs spread over its nodes, and each worker subscribes on the nodes it follows.
    redis_cluster: bool = False
    #: Seconds a run store that does not answer is waited for: a producer keeps its events and a
    #: follower its place (with keep-alive pings) meanwhile; longer, runs end with an error.
    store_outage: float = Field(10.0, gt=0, le=3600)
    #: Record Prometheus metrics of streams (needs the ``metrics`` extra: prometheus_client).
    metrics: bool = False
    #: Where ``GET`` serves the metrics while ``metrics`` is on; ``None``: nowhere (mount
    #: :func:`flask_sse_run.metrics.metrics_view` yourself).
    metrics_path: str | None = "/metrics"
    #: One log line per stream at its end (logger ``flask_sse_run.streams``, INFO).
    stream_log: bool = True
    #: ``info.title`` of ``openapi.json``; ``None`` uses the app's name.
    openapi_title: str | None = None
    #: ``info.version`` of ``openapi.json``: the version of your API, not of this package.
    openapi_version: str = "1.0.0"

    @property
    def auth_enabled(self) -> bool:
        """Whether requests must carry a bearer token (static tokens or a JWT key are set)."""
        return self.auth_tokens is not None or self.jwt_key is not None

    @field_validator("end_event", "shutdown_event")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\n" in value or "\r" in value):
            raise ValueError("must be a non-empty name without line breaks")
        return value

    @field_validator("metrics_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or len(value) < 2):
            raise ValueError("must be a path such as /metrics, or None")
        return value

    @field_validator("auth_tokens", "jwt_algorithms", mode="before")
    @classmethod
    def _list_not_str(cls, value: Any) -> Any:
        # A lone string would otherwise read as "not a valid tuple", which helps nobody.
        if isinstance(value, str):
            raise ValueError("must be a list of strings, not a string")
        return value

    @field_validator("auth_tokens")
    @classmethod
    def _tokens(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            check_static_tokens(value)
        return value

    @model_validator(mode="after")
    def _budget(self) -> Settings:
        if self.max_bytes < self.resume_max_bytes:
            raise ValueError("SSE_RUN_MAX_BYTES must be at least SSE_RUN_RESUME_MAX_BYTES (room for one run)")
        return self

    @model_validator(mode="after")
    def _jwt(self) -> Settings:
        if self.jwt_key is not None:
            check_jwt_settings(self.jwt_key, self.jwt_algorithms)
        elif self.jwt_audience is not None:
            raise ValueError("SSE_RUN_JWT_AUDIENCE is set but SSE_RUN_JWT_KEY is not")
        return self

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        """Read every ``SSE_RUN_*`` key of ``config``.

        Raises :class:`ConfigurationError` for an unknown ``SSE_RUN_*`` key (a typo would
        otherwise be ignored) or an invalid value.
        """
        values = {
            key[len(PREFIX) :].lower(): value for key, value in config.items() if key.startswith(PREFIX)
        }
        unknown = sorted(PREFIX + key.upper() for key in values if key not in cls.model_fields)
        if unknown:
            raise ConfigurationError(f"unknown configuration keys: {', '.join(unknown)}")
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                # A check across keys (model_validator) has no loc; its message names the keys.
                f"{PREFIX}{'.'.join(map(str, err['loc'])).upper()}: {_message(err['msg'])}"
                if err["loc"]
                else _message(err["msg"])
                for err in exc.errors(include_url=False, include_input=False)
            )
            raise ConfigurationError(problems) from None

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every config key with its default value."""
        return {PREFIX + name.upper(): field.default for name, field in cls.model_fields.items()}


def _message(msg: str) -> str:
    return msg.removeprefix("Value error, ")
