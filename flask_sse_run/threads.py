"""Run blocking or GIL-releasing work in a real OS thread and stream its items.

Under gevent, a long blocking call (a file read, a C extension, ``model.generate()``) in a
greenlet freezes every stream of the worker. :func:`iterate_in_thread` and
:func:`run_in_thread` run such work in a native thread and hand each item to the streaming
greenlet the moment it is produced, waking the hub with gevent's thread-safe async watcher
(:func:`call_in_thread`: one call, one result, through gevent's own thread pool).
gevent's queues, events and locks are never touched from the other thread: items cross in a
``deque`` (atomic appends and pops) and back-pressure uses a raw OS lock.

Without gevent the same code runs with a plain thread and blocking waits.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from .cancellation import current_token
from .concurrency import default_executor, gevent_patched, raw_lock
from .errors import SSERunError

__all__ = ["StreamClosed", "ThreadChannel", "call_in_thread", "iterate_in_thread", "run_in_thread"]

T = TypeVar("T")


class StreamClosed(SSERunError):
    """Raised by :meth:`ThreadChannel.send` once the stream no longer wants items."""


class ThreadChannel(Generic[T]):
    """The worker thread's end of the bridge: :meth:`send` items, poll :attr:`closed`."""

    def __init__(self, maxsize: int, wake: Callable[[], None]) -> None:
        self._items: deque[T] = deque()
        self._maxsize = maxsize
        self._wake = wake
        self._space = raw_lock()
        self._space.acquire()  # released by the consumer each time it takes an item
        self._closed = False
        self._token = current_token()
        self.done = False
        self.finished = False  # set after the last wake-up: the thread no longer touches us
        self.error: BaseException | None = None

    @property
    def closed(self) -> bool:
        """True once the consumer has stopped or the stream's client is gone."""
        return self._closed or (self._token is not None and self._token.cancelled)

    def send(self, item: T) -> None:
        """Hand ``item`` to the stream; blocks this thread while ``maxsize`` items wait.

        Raises :class:`StreamClosed` when the stream has stopped: let it end the work.
        """
        while len(self._items) >= self._maxsize and not self.closed:
            self._space.acquire(timeout=0.05)
        if self.closed:
            raise StreamClosed("the stream was closed")
        self._items.append(item)
        self._wake()

    # -- the consumer's side (the stream's greenlet or thread) -------------------------------

    def _take(self) -> Iterator[T]:
        while self._items:
            item = self._items.popleft()
            if self._space.locked():
                self._space.release()
            yield item

    def _close(self) -> None:
        self._closed = True
        if self._space.locked():
            self._space.release()

    def _finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done = True
        self._wake()
        self.finished = True


class _GeventWaiter:
    """Parks the consuming greenlet until the thread calls :meth:`wake`."""

    def __init__(self) -> None:
        from gevent import get_hub, sleep
        from gevent.event import Event

        self._sleep = sleep
        self._event = Event()
        self._watcher = get_hub().loop.async_()
        # Started once and kept started: libev forgets a send() made while it is stopped.
        self._watcher.start(self._event.set)
        self.wake: Callable[[], None] = self._watcher.send

    def wait(self) -> None:
        self._event.wait()
        self._event.clear()

    def close(self, channel: ThreadChannel[Any]) -> None:
        # ``done`` is set just before the thread's last send() on the watcher: closing in that
        # gap would close it under the thread. The gap is one C call; wait it out cooperatively.
        while not channel.finished:
            self._sleep(0.0005)
        self._watcher.close()


class _ThreadWaiter:
    def __init__(self) -> None:
        import threading

        self._event = threading.Event()
        self.wake: Callable[[], None] = self._event.set

    def wait(self) -> None:
        self._event.wait()
        self._event.clear()

    def close(self, channel: ThreadChannel[Any]) -> None:
        pass  # nothing to release: a threading.Event


def run_in_thread(
    work: Callable[[ThreadChannel[T]], Any],
    *,
    executor: concurrent.futures.Executor | None = None,
    maxsize: int = 64,
) -> Iterator[T]:
    """Call ``work(channel)`` in a real OS thread; yield each item it ``channel.send``-s.

    Items arrive in order, each as soon as it is sent. An exception raised by ``work`` is
    re-raised here after the items sent before it. Closing the returned iterator (as the
    runtime does when the client disconnects) makes ``channel.closed`` true and ``send`` raise
    :class:`StreamClosed`; the iterator's ``close`` then waits, without blocking other
    greenlets, for ``work`` to return. The thread runs in a copy of the caller's context, so
    :func:`~flask_sse_run.disconnected` works there. ``executor`` defaults to a shared pool of
    32 threads per process (:func:`~flask_sse_run.concurrency.default_executor`; a 33rd piece of
    work waits for a free thread, and is skipped if its stream ends meanwhile); pass
    ``thread_executor(1)`` to keep some work (torch) on one dedicated thread.
    """
    if maxsize < 1:
        raise ValueError("maxsize must be at least 1")
    return _bridge(work, executor, maxsize)


def _bridge(
    work: Callable[[ThreadChannel[T]], Any], executor: concurrent.futures.Executor | None, maxsize: int
) -> Iterator[T]:
    waiter = _GeventWaiter() if gevent_patched() else _ThreadWaiter()
    channel: ThreadChannel[T] = ThreadChannel(maxsize, waiter.wake)
    context = contextvars.copy_context()

    def target() -> None:
        error: BaseException | None = None
        try:
            if not channel.closed:  # queued behind busy threads while its stream ended
                context.run(work, channel)
        except StreamClosed:
            pass
        except BaseException as exc:  # handed to the consumer, which re-raises it
            error = exc
        finally:
            channel._finish(error)

    try:
        (executor or default_executor()).submit(target)
    except BaseException:
        channel._finish(None)
        waiter.close(channel)
        raise
    try:
        while True:
            yield from channel._take()
            if channel.done:
                yield from channel._take()  # items sent just before the end
                if channel.error is not None:
                    raise channel.error
                return
            waiter.wait()
    finally:
        channel._close()
        try:
            while not channel.done:
                waiter.wait()
        finally:
            if channel.done:
                waiter.close(channel)
            # else: this greenlet was killed while waiting; the watcher stays open (a few
            # bytes) rather than be closed under a thread that may still send() on it.


def call_in_thread(func: Callable[[], T]) -> T:
    """Return ``func()``, computed in a native thread under gevent (the hub's thread pool) while
    this greenlet waits and the others run; without gevent, here.

    For one CPU-bound call that would hold the hub: parsing a large body, tokenizing a long
    prompt. The interpreter hands the GIL back to the hub's thread every few milliseconds, which
    a call in the hub's own thread never would (a C call that releases the GIL does better). An
    exception ``func`` raises is raised here.
    """
    if not gevent_patched():
        return func()
    import gevent

    def outcome_as_value() -> tuple[bool, Any]:
        # gevent's pool prints the traceback of a task that raises: a refusal is no error.
        try:
            return True, func()
        except Exception as exc:
            return False, exc

    done, value = gevent.get_hub().threadpool.apply(outcome_as_value)
    if not done:
        raise value
    return value  # type: ignore[no-any-return]


def iterate_in_thread(
    source: Iterable[T],
    *,
    executor: concurrent.futures.Executor | None = None,
    maxsize: int = 64,
) -> Iterator[T]:
    """Iterate ``source`` in a real OS thread and yield its items here, as they come.

    For blocking or GIL-releasing iterators (file reads, C extensions, torch). The thread stops
    at its next item once the returned iterator is closed; the source's ``close`` (its
    ``finally`` blocks) then runs in that thread. See :func:`run_in_thread` for the rest.
    """

    def work(channel: ThreadChannel[T]) -> None:
        iterator = iter(source)
        try:
            for item in iterator:
                channel.send(item)
                if channel.closed:
                    break
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    return run_in_thread(work, executor=executor, maxsize=maxsize)
