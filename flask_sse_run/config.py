"""The ``SSE_RUN_*`` configuration keys, read and validated once in ``init_app``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

    @field_validator("end_event", "shutdown_event")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and (not value or "\n" in value or "\r" in value):
            raise ValueError("must be a non-empty name without line breaks")
        return value

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
                f"{PREFIX}{'.'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                for err in exc.errors(include_url=False, include_input=False)
            )
            raise ConfigurationError(problems) from None

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every config key with its default value."""
        return {PREFIX + name.upper(): field.default for name, field in cls.model_fields.items()}
