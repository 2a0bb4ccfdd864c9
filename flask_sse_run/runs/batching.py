"""Redis calls made in one turn of the worker's hub, sent together: one pipelined round trip.

Under gevent, thousands of runs' producers and followers each make a call at nearly the same
moment (a tick of their timers, an announcement). Alone, each is a write and a read of its own,
in the worker and in Redis. Here a call waits for the end of the hub's current turn, and the
turn's calls go out as one pipeline, from one greenlet (never the hub itself, which must not
block); each caller gets its own replies, or the error that ended the round trip. Without gevent
(threads, the test client) a call is its own pipeline, at once.

A round trip is written and read here, on a connection of the client's pool, rather than by
redis-py's pipeline: its per-command work (encoding each argument in Python, response
callbacks, retries, bookkeeping) was a third of a busy worker's CPU. Commands are packed by
hiredis where it is installed, and replies come back as Redis sends them (no response
callbacks: an ``XRANGE`` entry's fields are a flat list). On a Redis Cluster the commands go to the nodes
that own their keys' slots (a command's key: an ``EVALSHA``'s first key, else its first
argument), a round trip per node; the ones a node answers ``MOVED`` or ``ASK`` (a resharding)
are sent again, once, after the client learns the slots again.
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

    def _execute(self, commands: list[Command], again: bool = True) -> list[Any]:
        client = self._client()
        nodes = getattr(client, "nodes_manager", None)
        if nodes is None:
            return _round_trip(client.connection_pool, commands)
        from redis.crc import key_slot
        from redis.exceptions import AskError, MovedError

        groups: dict[str, tuple[Any, list[int]]] = {}
        for index, command in enumerate(commands):
            key = command[3] if command[0] == "EVALSHA" else command[1]
            node = nodes.get_node_from_slot(key_slot(key.encode() if isinstance(key, str) else key))
            groups.setdefault(node.name, (node, []))[1].append(index)
        replies: list[Any] = [None] * len(commands)
        for node, indices in groups.values():
            pool = client.get_redis_connection(node).connection_pool
            for index, reply in zip(indices, _round_trip(pool, [commands[i] for i in indices]), strict=True):
                replies[index] = reply
        moved = [i for i, reply in enumerate(replies) if isinstance(reply, (MovedError, AskError))]
        if moved and again:
            nodes.initialize()
            for index, reply in zip(
                moved, self._execute([commands[i] for i in moved], again=False), strict=True
            ):
                replies[index] = reply
        return replies


def _round_trip(pool: Any, commands: list[Command]) -> list[Any]:
    """Write ``commands`` on one of ``pool``'s connections at once and read their replies (an
    error reply in place); a connection that fails midway is closed, never reused."""
    from redis.exceptions import ResponseError

    connection = pool.get_connection()
    try:
        connection.send_packed_command(_pack(connection, commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except ResponseError as error:
                replies.append(error)
        return replies
    except BaseException:
        connection.disconnect()  # replies may be left unread on it
        raise
    finally:
        pool.release(connection)


def _pack(connection: Any, commands: list[Command]) -> list[bytes]:
    if _pack_command is None:
        return list(connection.pack_commands(commands))
    return [b"".join([_pack_command(command) for command in commands])]


_pack_command: Callable[[Command], bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # redis-py packs them (slower)
    _pack_command = None
