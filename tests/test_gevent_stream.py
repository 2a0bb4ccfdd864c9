"""GeventStream without a server, under gevent's monkey-patching (in a subprocess: patching is
process-wide). The live behaviour against gunicorn is in test_runtime_live.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seen() -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/gevent_stream_units.py")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_close_before_iteration_closes_the_users_generator(seen: dict[str, Any]) -> None:
    assert seen["close_before_iteration"] == ["finally, disconnected() True"]


def test_close_mid_stream_runs_the_generators_finally_at_once(seen: dict[str, Any]) -> None:
    # gunicorn closes the body when a write fails: the client is gone, and the generator is told.
    assert seen["close_mid_stream"] == {"first": "data: tick\n\n", "log": ["finally, disconnected() True"]}


def test_an_unencodable_item_ends_the_stream_without_telling_the_generator_its_client_left(
    seen: dict[str, Any],
) -> None:
    assert seen["unencodable"]["body"].startswith("event: error\n")
    assert seen["unencodable"]["log"] == ["finally, disconnected() False"]


def test_held_events_and_pings_go_through_the_servers_write_while_the_generator_blocks(
    seen: dict[str, Any],
) -> None:
    # "a", the first event, went out at once through the body; "b" was held (the generator had
    # not blocked yet) and sent by a helper once it blocked; then a ping every 0.2 s of silence;
    # "c" came back through the body.
    assert seen["keepalive"] == {
        "body": "data: a\n\ndata: c\n\n",
        "written": ["data: b\n\n", ": ping\n\n", ": ping\n\n"],
    }


def test_a_stream_started_after_shutdown_began_ends_with_the_shutdown_event(seen: dict[str, Any]) -> None:
    assert seen["after_shutdown"]["body"].endswith("event: shutdown\ndata: \n\n")
    # Shutting down ends the stream as a disconnect would: long-running work is told to stop.
    assert seen["after_shutdown"]["log"] == ["finally, disconnected() True"]
