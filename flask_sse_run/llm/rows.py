"""One request in the batched decode loop: the state its stream and the loop thread share.

Pure Python (no torch). A :class:`Row` is written by two sides:

* the **loop thread** (the device's dedicated OS thread) feeds it one token per step with
  :meth:`Row.accept`, which decodes the token incrementally, holds back text that may start a
  stop string and appends ``{"text", "index"}`` items; when the row ends it appends the summary
  and marks it finished;
* the **stream** (:class:`RowStream`, iterated by the request's greenlet, or thread without
  gevent) pops those items and sleeps on the row's event when there are none.

The loop never blocks on a stream: items go into a ``deque`` (appends and pops are atomic), a
row holds at most ``max_new_tokens`` of them, and the loop wakes the streams of every row that
got items in a step with one :class:`Wakeup` call. Under gevent that is one ``async`` watcher
send per step, whose callback on the hub sets each row's event: a gevent event must not be
touched from another OS thread. Without gevent the loop sets ``threading`` events directly.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol

from ..cancellation import CancelToken, current_token
from ..concurrency import gevent_patched
from .detokenize import IncrementalDetokenizer, TokenDecoder
from .params import GenerationParams
from .stops import StopStrings

__all__ = ["Row", "RowStream", "Wakeup", "make_wakeup", "per_output_token_ms"]


class _Event(Protocol):
    def set(self) -> None: ...
    def clear(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class Row:
    """One generation in the batch: its parameters, its text so far, and how it ended.

    ``started`` is a ``time.perf_counter()`` value (the request's arrival): the time to first
    token counts from it. The loop thread calls :meth:`begin`, :meth:`accept` and
    :meth:`finish`/:meth:`fail`; the stream reads :attr:`items`, :attr:`finished`,
    :attr:`error` and :attr:`summary`.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        tokenizer: TokenDecoder,
        eos_ids: Collection[int],
        started: float,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.eos_ids = frozenset(eos_ids)
        self.started = started
        # Each row draws from its own generator: the same seed gives the same text whatever
        # else runs in the batch. No seed: a random one, so no request predicts another's.
        self.rng = random.Random(params.seed if params.seed is not None else secrets.randbits(63))
        self.detokenizer = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self.stops = StopStrings(params.stop)
        self.items: deque[dict[str, Any]] = deque()
        self.generated = 0  # tokens streamed (EOS included), not those after a cancel or stop
        self.pieces = 0
        self.last_token: int | None = None
        self.began: float | None = None  # when its prefill started (it left the queue)
        self.first_token_at: float | None = None
        self.ended_at: float | None = None  # when it finished (not when it failed)
        self.after_cancel = 0  # tokens computed after the stream was cancelled (0 or 1)
        #: Set by the stream's side: the consumer has gone (closed) or its token cancelled.
        self.closed = False
        self.token: CancelToken | None = None
        self.event: _Event | None = None
        #: Per-row sampling state of the loop (a ``RowSampler``); opaque here.
        self.sampler: Any = None
        #: Where the row is, for its scheduler: "reserved", "waiting", "running", "withdrawn".
        self.stage = "new"
        self.finished = False
        self.error: BaseException | None = None
        self.summary: dict[str, Any] | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the row should leave the batch: its stream closed or its token cancelled."""
        return self.closed or (self.token is not None and self.token.cancelled)

    @property
    def remaining(self) -> int:
        """Tokens this row may still generate."""
        return self.params.max_new_tokens - self.generated

    # -- the loop thread's side --------------------------------------------------------------

    def begin(self) -> None:
        """Mark the start of its prefill (for tokens per second)."""
        self.began = time.perf_counter()

    def accept(self, token_id: int) -> bool:
        """Take the token the last step made for this row; return True when the row is done.

        A row cancelled while the step ran keeps the token uncounted (``after_cancel``) and is
        done. Otherwise the token's text (if complete, and not past a stop string) becomes an
        item; the row is done at EOS, at a stop string or at ``max_new_tokens``.
        """
        if self.cancelled:
            self.after_cancel += 1
            return True
        self.generated += 1
        self.last_token = token_id
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._send(self.stops.feed(self.detokenizer.push(token_id)))
        return self.stops.stopped or token_id in self.eos_ids or self.generated >= self.params.max_new_tokens

    def _send(self, text: str) -> None:
        if text:
            self.items.append({"text": text, "index": self.pieces})
            self.pieces += 1

    def finish(self) -> None:
        """End the row: flush held-back text, append the summary, mark it finished (once)."""
        if self.finished:
            return
        if self.cancelled:
            reason = "cancelled"
        elif self.stops.stopped:
            reason = "stop"
        else:
            self._send(self.stops.feed(self.detokenizer.flush()))
            self._send(self.stops.flush())
            if self.stops.stopped:
                reason = "stop"
            elif self.last_token in self.eos_ids:
                reason = "eos"
            else:
                reason = "length"
        ended = self.ended_at = time.perf_counter()
        began = self.began if self.began is not None else ended
        first = self.first_token_at
        self.summary = {
            "finish_reason": reason,
            "generated_tokens": self.generated,
            "prompt_tokens": len(self.prompt_ids),
            "time_to_first_token_ms": None if first is None else round((first - self.started) * 1000, 2),
            "tokens_per_s": round(self.generated / max(ended - began, 1e-9), 2),
        }
        self.items.append(self.summary)
        self.finished = True

    def fail(self, error: BaseException) -> None:
        """End the row with ``error`` (unless it has ended): its stream re-raises it after the
        items sent before."""
        if self.finished:
            return
        self.error = error
        self.summary = {
            "finish_reason": "error",
            "generated_tokens": self.generated,
            "prompt_tokens": len(self.prompt_ids),
            "time_to_first_token_ms": None,
            "tokens_per_s": 0.0,
        }
        self.finished = True


class Wakeup(Protocol):
    """Wakes the streams of rows that got items: called by the loop thread, once per step.

    ``on_step`` (given to :func:`make_wakeup`) runs once per wake-up on the streams' side (the
    hub under gevent), after the events are set: where the loop's figures may be handed to code
    that must not run on the loop's thread (prometheus_client's locks are gevent's there).
    """

    calls: int

    def new_event(self) -> _Event:
        """An event for one row's stream (call it on the stream's side)."""
        ...

    def notify(self, rows: Iterable[Row]) -> None:
        """Wake the streams of ``rows`` (from the loop thread)."""
        ...


class _HubWakeup:
    """Under gevent: one async watcher for all rows; its callback, on the hub, sets their events."""

    def __init__(self, on_step: Callable[[], object] | None = None) -> None:
        from gevent import get_hub

        self.calls = 0
        self._on_step = on_step
        self._rows: deque[Row] = deque()
        self._watcher = get_hub().loop.async_()
        # Started once and kept started: libev forgets a send() made while it is stopped. Not
        # referenced: an idle scheduler must not keep the worker's loop alive at exit.
        self._watcher.start(self._deliver)
        self._watcher.ref = False

    def new_event(self) -> _Event:
        from gevent.event import Event

        event: _Event = Event()
        return event

    def notify(self, rows: Iterable[Row]) -> None:
        self._rows.extend(rows)
        self.calls += 1
        self._watcher.send()

    def _deliver(self) -> None:
        while self._rows:
            event = self._rows.popleft().event
            if event is not None:
                event.set()
        if self._on_step is not None:
            self._on_step()


class _ThreadWakeup:
    """Without gevent: streams wait on ``threading`` events, which any thread may set."""

    def __init__(self, on_step: Callable[[], object] | None = None) -> None:
        self.calls = 0
        self._on_step = on_step

    def new_event(self) -> _Event:
        return threading.Event()

    def notify(self, rows: Iterable[Row]) -> None:
        self.calls += 1
        for row in rows:
            if row.event is not None:
                row.event.set()
        if self._on_step is not None:
            self._on_step()


def make_wakeup(on_step: Callable[[], object] | None = None) -> Wakeup:
    """The wake-up for this process: gevent's hub when patched, plain threads otherwise.

    Call it on the thread that serves the streams (under gevent: the hub's, after the fork).
    ``on_step`` runs after each wake-up, on that side (see :class:`Wakeup`).
    """
    return _HubWakeup(on_step) if gevent_patched() else _ThreadWakeup(on_step)


class _Queue(Protocol):
    """What a stream needs of the scheduler that runs its row."""

    def submit(self, row: Row) -> None: ...

    def withdraw(self, row: Row) -> bool: ...


class RowStream:
    """The stream of one row: ``{"text", "index"}`` items as the steps make them, then a summary.

    The row enters the scheduler's queue at the first ``next()``, when the stream's cancel token
    is current; :meth:`close` (the client left) takes it out of the queue at once or, once it
    runs, makes it leave the batch at the next step and waits (cooperatively) for that.
    ``on_finish`` gets the summary plus ``tokens_after_cancel``, ``queue_ms`` (from the request's
    arrival to its prefill) and ``time_per_output_token_ms`` (after the first token; ``None``
    below two tokens) once the row has ended, in the stream's greenlet or thread. A class rather
    than a generator: a generator that never started ignores ``close()``, and the place of a
    request whose client left before the first byte would then leak.
    """

    def __init__(
        self,
        queue: _Queue,
        row: Row,
        wakeup: Wakeup,
        on_finish: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        self._queue = queue
        self.row = row
        self._wakeup = wakeup
        self._on_finish = on_finish
        self._submitted = False
        self._closed = False
        self._recorded = False

    def __iter__(self) -> RowStream:
        return self

    def __next__(self) -> dict[str, Any]:
        row = self.row
        if self._closed:
            raise StopIteration
        if not self._submitted:
            self._submitted = True
            row.token = current_token()
            row.event = self._wakeup.new_event()
            self._queue.submit(row)
        event = row.event
        assert event is not None
        while True:
            if row.items:
                return row.items.popleft()
            if row.finished:
                self._record()
                self._closed = True
                if row.error is not None:
                    raise row.error
                raise StopIteration
            event.wait()
            event.clear()

    def close(self) -> None:
        """Stop the row (idempotent); returns once the loop has let it go."""
        if self._closed:
            return
        self._closed = True
        row = self.row
        row.closed = True
        if self._queue.withdraw(row):
            return  # it never reached the batch: nothing to wait for, nothing to record
        event = row.event
        assert event is not None
        while not row.finished:  # at most one step of the loop
            event.wait()
            event.clear()
        self._record()

    def _record(self) -> None:
        if self._recorded or self._on_finish is None or self.row.summary is None:
            return
        self._recorded = True
        row = self.row
        summary = dict(row.summary)  # type: ignore[arg-type]  # checked above
        summary["tokens_after_cancel"] = row.after_cancel
        summary["queue_ms"] = None if row.began is None else round((row.began - row.started) * 1000, 2)
        summary["time_per_output_token_ms"] = per_output_token_ms(
            row.first_token_at, row.ended_at, row.generated
        )
        self._on_finish(summary)


def per_output_token_ms(first: float | None, ended: float | None, tokens: int) -> float | None:
    """Milliseconds per output token after the first (OpenTelemetry GenAI's
    ``time_per_output_token``): ``(ended - first) / (tokens - 1)``; ``None`` below two tokens."""
    if first is None or ended is None or tokens < 2:
        return None
    return round((ended - first) * 1000 / (tokens - 1), 3)
