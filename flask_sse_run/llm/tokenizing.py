"""Tokenizing prompts without holding the worker's hub, a bounded number at once.

A prompt of a megabyte takes the tokenizer a few tenths of a second (0.4 to 0.7 s with the
tests' tiny tokenizers on this project's 2-core machine). In a greenlet that is the hub's time:
thirty such prompts at once took the worker's ``/health`` to a p99 of 4.1 s. So a prompt longer
than :data:`LARGE_PROMPT` characters is tokenized in a native thread
(:func:`~flask_sse_run.threads.call_in_thread`; the fast tokenizers release the GIL while they
encode), and at most ``concurrency`` of them at a time in a worker: each is a core's work, and
the model's thread needs one too. The next ones wait for their turn, up to ``max_queue`` of
them; beyond, ``503`` with ``Retry-After``, as when the model's own queue is full. Shorter
prompts are tokenized at once where they are: a thread's round trip would cost more than the
work (16 KiB: 4 to 6 ms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..concurrency import new_semaphore, raw_lock
from ..errors import RequestError
from ..threads import call_in_thread

__all__ = ["LARGE_PROMPT", "PromptGate"]

T = TypeVar("T")

#: Prompts (or conversations) longer than this, in characters, are tokenized off the hub.
LARGE_PROMPT = 16 * 1024


class PromptGate:
    """Runs the tokenizer's work on large prompts off the hub, ``concurrency`` at a time."""

    def __init__(self, concurrency: int, max_queue: int, retry_after: int) -> None:
        if concurrency < 1 or max_queue < 0:
            raise ValueError("need concurrency >= 1 and max_queue >= 0")
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._slots = new_semaphore(concurrency)
        # An OS lock also under gevent: held only around the counts, where no greenlet switches.
        self._counts = raw_lock()
        self._busy = 0
        self._waiting = 0

    @property
    def busy(self) -> int:
        """Large prompts being tokenized now."""
        return self._busy

    def run(self, size: int, work: Callable[[], T]) -> T:
        """``work()`` (the tokenizer's, on text of ``size`` characters): here when the text is
        short, else off the hub in its turn.

        Raises :class:`RequestError` 503 with ``Retry-After`` when ``concurrency`` large prompts
        are being tokenized and ``max_queue`` more wait.
        """
        if size <= LARGE_PROMPT:
            return work()
        with self._counts:
            if self._busy + self._waiting >= self.concurrency + self.max_queue:
                busy, waiting = self._busy, self._waiting
                refused = True
            else:
                self._waiting += 1
                refused = False
        if refused:
            raise RequestError(
                503,
                f"the server is busy reading other long prompts: {busy} now, {waiting} waiting; retry later",
                headers={"Retry-After": str(self.retry_after)},
            )
        try:
            self._slots.acquire()
        except BaseException:  # the greenlet was interrupted in line
            with self._counts:
                self._waiting -= 1
            raise
        with self._counts:
            self._waiting -= 1
            self._busy += 1
        try:
            return call_in_thread(work)
        finally:
            with self._counts:
                self._busy -= 1
            self._slots.release()
