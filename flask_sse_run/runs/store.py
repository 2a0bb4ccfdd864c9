"""What a run store is: the small interface between the runtime and where runs' events live.

A run's producer (the generator, running detached from any connection) appends its encoded
events in order; any number of responses read them after a position and wait for more. The
runtime never looks inside a store, so an in-process one (:class:`~.memory.MemoryRunStore`, the
default) and one shared by every worker and replica (Redis Streams) are interchangeable.

Contract, for every implementation:

* ``append`` is called in order of ``seq`` and never concurrently for one run; a store may drop
  a run's oldest events to stay within its bounds, and ``read`` then reports how many a
  position missed rather than leave a silent gap.
* ``wait`` returns once events after the position exist, the run has ended, or ``timeout``
  passed; it blocks only the calling greenlet (or thread).
* A run that ended stays readable for the store's TTL, then is forgotten (``get`` is ``None``).
* Calls that cannot reach the store raise :class:`StoreUnavailable` (a 503), never hang.
* A run ends once: by its producer (:meth:`RunStore.finish`), or from anywhere by a cancel
  (:meth:`RunStore.cancel`) or, in a store shared by processes, when its producer is lost. The
  event that says how it ended is its last event, with the next seq, so a reader, live or
  reconnecting later, learns how it ended and never takes a run cut short for a finished one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import RequestError

__all__ = [
    "ENDED",
    "LOST",
    "RUNNING",
    "RunInfo",
    "RunSlice",
    "RunStore",
    "StoreFull",
    "StoreUnavailable",
]

RUNNING = "running"
#: The status of a run whose producer stopped renewing its lease (a worker killed or cut off).
LOST = "lost"
#: How a run can end: its generator finished, raised (or its store was away too long), was
#: cancelled (DELETE, or no client came back within the window), the worker producing it shut
#: down, or that worker was lost.
ENDED = frozenset({"complete", "error", "cancelled", "shutdown", LOST})


class StoreUnavailable(RequestError):
    """The run store cannot be reached (503, ``Retry-After``)."""

    def __init__(self, message: str = "the run store is unavailable; try again shortly") -> None:
        super().__init__(503, message, headers={"Retry-After": "5"})


class StoreFull(RequestError):
    """This worker holds as many runs as it may (``SSE_RUN_MAX_RUNS``), or its runs as many bytes
    of events (``SSE_RUN_MAX_BYTES``; ``what`` says which): 503 with ``Retry-After``."""

    def __init__(self, limit: int, retry_after: int, *, what: str = "runs") -> None:
        super().__init__(
            503, f"this server holds {limit} {what} already; try again shortly",
            headers={"Retry-After": str(retry_after)},
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What is known of a run, apart from its events."""

    run_id: str
    #: The registered function's name, and the URL prefix it was started under: the instance's
    #: ``url_prefix``, below a blueprint's prefix (with this request's values, ``/acme``).
    function: str
    prefix: str
    #: The JWT ``sub`` of the request that started it, or ``None`` (no JWT).
    owner: str | None
    status: str
    #: The highest seq appended so far (0: none yet).
    last_seq: int = 0
    #: Clients tailing it now, in every worker.
    clients: int = 0
    #: When (``time.time()``) its last client left, or it was started with none; ``None``
    #: while a client is attached.
    idle_since: float | None = None

    @property
    def running(self) -> bool:
        """Whether its generator is still producing."""
        return self.status == RUNNING


@dataclass(frozen=True, slots=True)
class RunSlice:
    """Events of a run after a position, as :meth:`RunStore.read` found them."""

    #: Chunks in order, each ``(seq of its last event, encoded events)``: one event, or several
    #: consecutive ones as a store keeps them (the Redis store, a batch), never one cut in two.
    events: Sequence[tuple[int, bytes]]
    #: Events after the position that the store no longer holds (dropped to stay in bounds).
    missed: int
    status: str
    #: The seq of the last event the run has produced so far.
    last_seq: int
    #: What the store knew of the run's changes when the read began, for :meth:`RunStore.wait`
    #: (a store that hears of changes can then wait without asking again); ``None``: nothing.
    mark: object = None
    #: When a channel was made (its store's clock), to tell it from one of the same name made
    #: again since (its seqs started over); ``None`` for a run, or a store where that cannot be.
    born: str | None = None

    @property
    def ended(self) -> bool:
        """Whether the run has ended (what is held may still be read)."""
        return self.status != RUNNING


class RunStore(ABC):
    """Where runs' events and state live; see the module docstring for the contract."""

    #: Seconds a channel's history lives after its last publish, once no one follows it (a
    #: store with channels sets its own).
    channel_ttl: float = 600.0

    @abstractmethod
    def create(self, run_id: str, function: str, prefix: str, owner: str | None) -> None:
        """Record a new run (running, no client yet). Raises :class:`StoreFull`,
        :class:`StoreUnavailable`."""

    @abstractmethod
    def append(self, run_id: str, events: Sequence[tuple[int, bytes]]) -> bool:
        """Add ``(seq, encoded event)`` pairs to a running run; ``False`` (nothing added) when
        the run is no longer running: it was cancelled or lost elsewhere, or is gone."""

    @abstractmethod
    def finish(self, run_id: str, status: str, event: bytes = b"") -> bool:
        """End a running run with ``status`` (one of ``ENDED``); ``event`` (encoded, without its
        ``id:`` line), if any, is stored as its last event with the next seq. Waiting readers
        wake. ``False`` when the run was not running (it ended elsewhere, or is gone)."""

    @abstractmethod
    def get(self, run_id: str) -> RunInfo | None:
        """The run's state, or ``None`` if unknown or expired."""

    def get_many(self, run_ids: Sequence[str]) -> list[RunInfo | None]:
        """:meth:`get` for each of ``run_ids`` (a store with round trips makes it one)."""
        return [self.get(run_id) for run_id in run_ids]

    @abstractmethod
    def read(self, run_id: str, after: int, limit: int) -> RunSlice | None:
        """Up to ``limit`` chunks of events with a seq above ``after``; ``None`` if the run is
        unknown."""

    @abstractmethod
    def wait(self, run_id: str, after: int, timeout: float, mark: object = None) -> None:
        """Block (cooperatively) until the run has an event above ``after``, has ended, or
        ``timeout`` seconds passed. ``mark``: the :attr:`RunSlice.mark` of the read that found
        nothing after ``after``. It may return early: the caller reads again."""

    @abstractmethod
    def attach(self, run_id: str) -> None:
        """A client starts tailing the run."""

    @abstractmethod
    def detach(self, run_id: str) -> None:
        """A client stopped tailing the run (the last one leaving starts its window)."""

    @abstractmethod
    def cancel(self, run_id: str, event: bytes) -> bool:
        """End the run as ``cancelled`` wherever it is produced, with ``event`` as its last event
        (as :meth:`finish`); its producer's next append is refused. ``False`` if the run is
        unknown; ``True`` for a run that exists, ended or not."""

    def open_channel(self, run_id: str) -> int:
        """Make sure the channel held by run ``run_id`` exists (a running run with no producer,
        never lost), and keep its events from expiring for the channel's TTL; return its last
        seq (0: none yet, or it expired and starts again)."""
        raise NotImplementedError(f"{type(self).__name__} holds no channels")

    def publish(self, run_id: str, id_prefix: bytes, event: bytes) -> int:
        """Append ``event`` (encoded, without its ``id:`` line) to the channel held by run
        ``run_id`` (made if need be), with the next seq and the line ``id: <id_prefix><seq>``;
        return the seq. Publishers may be many, anywhere: the store gives the seqs. The channel
        keeps its last ``channel_history`` events, and forgets them all ``channel_ttl`` seconds
        after its last publish once no one follows it."""
        raise NotImplementedError(f"{type(self).__name__} holds no channels")

    def heartbeat(self, run_ids: Sequence[str]) -> dict[str, RunInfo | None]:
        """These runs, produced here, are alive: the runtime's janitor calls this every
        ``JANITOR_INTERVAL`` (a shared store renews their leases and keys with it). Returns the
        states it read, by run id: all of them, or those whose state it had to read."""
        return dict(zip(run_ids, self.get_many(run_ids), strict=True))

    def expire(self) -> None:  # noqa: B027 - optional: stores whose entries expire by themselves
        """Forget ended runs older than the TTL (called every second or so by the runtime)."""

    def pending(self) -> bool:
        """Whether :meth:`expire` still has runs to look after (the janitor stops otherwise)."""
        return False

    def released(self) -> int:
        """Bytes of events this process let go of (runs forgotten) since the last call: after
        many, the janitor gives the freed memory back to the OS. 0: none held here."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections and timers."""
