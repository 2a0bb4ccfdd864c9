"""Redis calls made in one turn of the worker's hub, sent together: one pipelined round trip.

Under gevent, thousands of runs' producers and followers each make a call at nearly the same
moment (a tick of their timers, an announcement). Alone, each is a write and a read of its own,
in the worker and in Redis. Here a call waits for the end of the hub's current turn, and the
turn's calls go out as one pipeline, from one greenlet (never the hub itself, which must not
block); each caller gets its own replies, or the error that ended the round trip. Without gevent
(threads, the test client) a call is its own pipeline, at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..concurrency import gevent_patched, new_event

__all__ = ["Batcher"]

Command = tuple[Any, ...]


class _Call:
    __slots__ = ("commands", "done", "error", "replies")

    def __init__(self, commands: Sequence[Command]) -> None:
        self.commands = commands
        self.replies: list[Any] = []
        self.error: BaseException | None = None
        self.done = new_event()


class Batcher:
    """Send each hub turn's calls to ``client()`` in one pipeline. ``scripts`` maps a script's
    SHA1 to its source, loaded again where Redis answers ``no_script`` (redis-py's
    ``NoScriptError``: a restarted server)."""

    def __init__(
        self, client: Callable[[], Any], scripts: dict[str, Any], no_script: type[BaseException]
    ) -> None:
        self._client = client
        self._scripts = scripts
        self._no_script = no_script
        self._pending: list[_Call] = []
        self._scheduled = False

    def run(self, commands: Sequence[Command]) -> list[Any]:
        """The replies to ``commands`` (an error reply in place of its command's reply); raises
        what ended the round trip (a connection error, a timeout)."""
        if not gevent_patched():
            return self._send_now(commands)
        call = _Call(commands)
        self._pending.append(call)
        if not self._scheduled:
            import gevent

            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._turn_ended)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.replies

    def _turn_ended(self) -> None:
        import gevent

        self._scheduled = False
        calls, self._pending = self._pending, []
        if calls:
            gevent.spawn_raw(self._send, calls)

    def _send(self, calls: list[_Call]) -> None:
        try:
            replies = self._pipeline([command for call in calls for command in call.commands])
            start = 0
            for call in calls:
                call.replies = replies[start : start + len(call.commands)]
                start += len(call.commands)
        except BaseException as exc:  # every caller gets it, none waits forever
            for call in calls:
                call.error = exc
        finally:
            for call in calls:
                call.done.set()

    def _send_now(self, commands: Sequence[Command]) -> list[Any]:
        return self._pipeline(list(commands))

    def _pipeline(self, commands: list[Command]) -> list[Any]:
        replies = self._execute(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, self._no_script)]
        if missing:  # a Redis that lost its scripts: load them, and send those again
            for sha in {commands[i][1] for i in missing}:
                self._client().script_load(self._scripts[sha])
            for i, reply in zip(missing, self._execute([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    def _execute(self, commands: list[Command]) -> list[Any]:
        pipe = self._client().pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))
