"""Tokenizing prompts without holding the worker's hub, a bounded number at once.

A prompt of a megabyte takes the tokenizer a few tenths of a second (0.4 to 0.7 s with the
tests' tiny tokenizers on this project's 2-core machine). In a greenlet that is the hub's time:
thirty such prompts at once took the worker's ``/health`` to a p99 of 4.1 s. So a prompt longer
than :data:`LARGE_PROMPT` characters is tokenized in a native thread
(:func:`~flask_sse_run.threads.call_in_thread`; the fast tokenizers release the GIL while they
encode), and at most ``concurrency`` of them at a time in a worker: each is a core's work, and
the model's thread needs one too. The next ones wait for their turn, up to ``max_queue`` of
them; beyond, ``503`` with ``Retry-After``, as when the model's own queue is full (the same
:class:`~flask_sse_run.llm.admission.DeviceQueue`). Shorter prompts are tokenized at once where
they are: a thread's round trip would cost more than the work (16 KiB: 4 to 6 ms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..threads import call_in_thread
from .admission import DeviceQueue

__all__ = ["LARGE_PROMPT", "PromptGate"]

T = TypeVar("T")

#: Prompts (or conversations) longer than this, in characters, are tokenized off the hub.
LARGE_PROMPT = 16 * 1024
_BUSY = "the server is busy reading other long prompts: {running} now, {waiting} waiting; retry later"


class PromptGate:
    """Runs the tokenizer's work on large prompts off the hub, ``concurrency`` at a time."""

    def __init__(self, concurrency: int, max_queue: int, retry_after: int) -> None:
        self._queue = DeviceQueue(concurrency, max_queue, retry_after, busy=_BUSY)

    @property
    def busy(self) -> int:
        """Large prompts being tokenized now."""
        return self._queue.running

    def run(self, size: int, work: Callable[[], T]) -> T:
        """``work()`` (the tokenizer's, on text of ``size`` characters): here when the text is
        short, else off the hub in its turn.

        Raises :class:`~flask_sse_run.errors.RequestError` 503 with ``Retry-After`` when
        ``concurrency`` large prompts are being tokenized and ``max_queue`` more wait.
        """
        if size <= LARGE_PROMPT:
            return work()
        ticket = self._queue.admit()
        try:
            ticket.wait()
            return call_in_thread(work)
        finally:
            ticket.release()
