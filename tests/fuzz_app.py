"""A small app for fuzzing: varied parameter types, every value bounded so each call is fast.

Served under real gunicorn by ``tests/test_hostile_input.py`` ("tests.fuzz_app:create_app()").
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from flask import Flask
from pydantic import BaseModel, Field

from flask_sse_run import Event, SSERun

sse = SSERun()


class Mode(enum.Enum):
    PLAIN = "plain"
    LOUD = "loud"


class Shape(BaseModel):
    kind: Literal["circle", "square"]
    size: Annotated[float, Field(ge=0, le=1000, description="Length of a side, or the radius.")]
    tags: list[str] = []


@sse.function
def count(n: Annotated[int, Field(ge=0, le=20)], label: str = "i") -> Iterator[dict[str, int]]:
    """Count from 0 to ``n - 1``, one JSON event each."""
    for i in range(n):
        yield {label: i}


@sse.function
def echo(text: str, times: Annotated[int, Field(ge=1, le=5)] = 1, mode: Mode = Mode.PLAIN) -> Iterator[Any]:
    """Send ``text`` back ``times`` times, as plain events and as named events.

    Args:
        text: what to send back; line breaks split it over several ``data:`` lines.
        times: how many times.
    """
    for i in range(times):
        yield text.upper() if mode is Mode.LOUD else text
        yield Event(data={"text": text}, event="echo", id=str(i))


@sse.function
def area(shape: Shape, scale: float | None = None, weights: dict[str, float] | None = None) -> dict[str, Any]:
    """Area of a shape (a plain value: always answered as JSON)."""
    side = shape.size * (1.0 if scale is None else max(min(scale, 10.0), -10.0))
    value = 3.14159 * side * side if shape.kind == "circle" else side * side
    return {"area": value, "tags": shape.tags, "weights": sorted((weights or {}).items())}


@sse.function
def total(rows: Annotated[list[list[int]], Field(max_length=50)], flag: bool = False) -> Iterator[int]:
    """Sum each row."""
    for row in rows:
        yield sum(row) if not flag else len(row)


@sse.function(resumable=True, methods=("GET", "POST"))
def spell(
    word: Annotated[str, Field(max_length=20)],
    times: Annotated[int, Field(ge=1, le=3)] = 1,
    tags: list[str] | None = None,
    limit: Annotated[int, Field(ge=0)] | None = None,
    mode: Mode = Mode.PLAIN,
) -> Iterator[str]:
    """Spell ``word`` letter by letter, ``times`` times, as a resumable run (GET or POST).

    Args:
        word: the word to spell.
        tags: sent first, one event each.
        limit: send at most this many letters.
    """
    yield from (tags or [])[:20]
    letters = [c.upper() if mode is Mode.LOUD else c for c in word] * times
    yield from letters[:limit]


@sse.function(public=True)
def ping() -> Iterator[str]:
    """Answer "pong", without a token even when auth is on."""
    yield "pong"


def create_app(**config: Any) -> Flask:
    """The fuzzing app; ``TEST_APP_CONFIG`` (JSON) adds config when gunicorn builds it."""
    app = Flask(__name__)
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)
    sse.init_app(app)
    return app
