"""``flask sse publish CHANNEL DATA``: publish on a channel from a shell, a cron job, a script.

It runs in a process of its own, so it reaches the app's subscribers only through a store they
share: with the in-process store it refuses (exit status 1) rather than publish where no one
listens.
"""

from __future__ import annotations

import json
from typing import Any

import click
from flask import current_app
from flask.cli import with_appcontext

from ..registry import EXTENSION_KEY
from ..runs.memory import MemoryRunStore
from ..runs.store import StoreUnavailable
from .publishing import publish

__all__ = ["sse_cli"]


@click.group("sse", help="flask-sse-run: channels.")
def sse_cli() -> None:
    """The ``flask sse`` commands."""


@sse_cli.command("publish")
@click.argument("channel")
@click.argument("data")
@click.option("--event", "event", default=None, help="The event's name (default: a plain message).")
@click.option("--json", "as_json", is_flag=True, help="DATA is JSON: sent as its compact encoding.")
@with_appcontext
def publish_command(channel: str, data: str, event: str | None, as_json: bool) -> None:
    """Publish DATA on CHANNEL; print the event's id."""
    state = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise click.ClickException("flask-sse-run is not set up on this app")
    if isinstance(state.runs.store, MemoryRunStore):
        raise click.ClickException(
            "this app keeps channels in each process's memory: a publish from this command would "
            "reach no subscriber; set SSE_RUN_REDIS_URL"
        )
    value: Any = data
    if as_json:
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise click.ClickException(f"DATA is not JSON: {exc}") from None
    try:
        click.echo(publish(state, channel, value, event))
    except (ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    except StoreUnavailable as exc:
        raise click.ClickException(exc.message) from None
