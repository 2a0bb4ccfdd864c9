"""Where code really runs: gevent's hub or plain threads, and the thread executors we use.

Under gunicorn's gevent worker ``threading`` is monkey-patched: a ``threading.Thread`` is a
greenlet, ``threading.Lock`` is a gevent lock and ``queue.Queue`` blocks greenlets. Code that
must run in a real OS thread, or synchronise with one, takes the originals from here.
"""

from __future__ import annotations

import _thread
import concurrent.futures
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "default_executor",
    "gevent_patched",
    "gunicorn_sync_worker",
    "new_event",
    "new_lock",
    "new_semaphore",
    "pause",
    "raw_lock",
    "spawn",
    "thread_executor",
]


_patched = False  # patching cannot be undone: once seen, it is remembered (a per-request check)


def gevent_patched() -> bool:
    """Whether ``threading`` is monkey-patched by gevent (gunicorn ``-k gevent``)."""
    global _patched
    if not _patched:
        monkey = sys.modules.get("gevent.monkey")
        _patched = monkey is not None and bool(monkey.is_module_patched("threading"))
    return _patched


def gunicorn_sync_worker() -> bool:
    """Whether this process is a worker of gunicorn's default ``sync`` worker class.

    gunicorn's master imports the worker class's module before it forks: a sync worker holds
    ``gunicorn.workers.sync``, and no other worker class imports it.
    """
    return "gunicorn.workers.sync" in sys.modules


_original_allocate_lock: Callable[[], Any] | None = None


def raw_lock() -> Any:
    """A lock of the OS, usable between native threads even when gevent has patched them."""
    global _original_allocate_lock
    if not gevent_patched():
        return _thread.allocate_lock()
    if _original_allocate_lock is None:  # get_original is slow; every stream makes a lock
        from gevent import monkey

        _original_allocate_lock = monkey.get_original("_thread", "allocate_lock")
    return _original_allocate_lock()


def new_event() -> Any:
    """An event flag for waiting greenlets (gevent's) or threads (``threading``'s)."""
    if gevent_patched():
        from gevent.event import Event

        return Event()
    return threading.Event()


def new_lock() -> Any:
    """A lock for greenlets (gevent's, which yields while it waits) or threads; made where it is
    used, after gevent patched (a store made before the fork must not hold an OS lock across a
    greenlet switch)."""
    if gevent_patched():
        from gevent.lock import BoundedSemaphore

        return BoundedSemaphore()
    return threading.Lock()


def new_semaphore(value: int) -> Any:
    """A semaphore of ``value`` for greenlets (gevent's, which yields while it waits) or threads."""
    if gevent_patched():
        from gevent.lock import BoundedSemaphore

        return BoundedSemaphore(value)
    return threading.BoundedSemaphore(value)


def pause(seconds: float) -> None:
    """Sleep ``seconds``, letting the worker's other greenlets run under gevent."""
    if gevent_patched():
        import gevent

        gevent.sleep(seconds)
    else:
        time.sleep(seconds)


def spawn(target: Callable[[], object]) -> Any:
    """Run ``target`` on its own: a greenlet under gevent, else a daemon thread.

    Returns the greenlet (so it can be interrupted) or the thread. The greenlet is a raw one:
    ``gevent.spawn`` records the spawning stack for every greenlet, which costs tens of
    microseconds deep in a gunicorn worker (a resumable run starts one per request).
    """
    if gevent_patched():
        import gevent

        return gevent.spawn_raw(target)
    thread = threading.Thread(target=target, daemon=True, name="sse-run-producer")
    thread.start()
    return thread


def thread_executor(max_workers: int, name: str = "sse-run") -> concurrent.futures.Executor:
    """An executor whose workers are real OS threads, also under gevent's monkey-patching.

    ``name`` prefixes the threads' names (gevent's pool names its own threads). Create it in
    the process that uses it (after gunicorn forks): threads do not survive a fork.
    """
    if gevent_patched():
        from gevent.threadpool import ThreadPoolExecutor

        return ThreadPoolExecutor(max_workers=max_workers)  # type: ignore[no-any-return]
    return concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)


_default: tuple[int, concurrent.futures.Executor] | None = None
_default_lock = threading.Lock()
DEFAULT_MAX_WORKERS = 32


def default_executor() -> concurrent.futures.Executor:
    """The process's shared executor for :func:`~flask_sse_run.iterate_in_thread` (32 threads).

    Made lazily and again after a fork, so a ``--preload``-ed master never hands its threads
    (which the child would not have) to a worker.
    """
    global _default
    with _default_lock:
        if _default is None or _default[0] != os.getpid():
            _default = (os.getpid(), thread_executor(DEFAULT_MAX_WORKERS))
        return _default[1]
