"""The decode loop of one device: every admitted request decodes in one batch, step by step.

:class:`BatchScheduler` has two sides.

* **The streams' side** (the hub under gevent, request threads otherwise): :meth:`admit`
  refuses a request before its response starts (503 with ``Retry-After`` when ``max_batch``
  rows run and ``max_queue`` more wait; 422 when the prompt and ``max_new_tokens`` could never
  fit ``max_batch_tokens``) and returns its :class:`~.rows.RowStream`. The stream's first
  ``next()`` queues its row; closing the stream takes the row out of the queue, or out of the
  batch at the next step.
* **The loop** runs on the device's dedicated OS thread (the executor given, one thread) while
  there is work, and ends when there is none; the next request starts it again. Each turn:
  rows whose stream was closed or cancelled leave; waiting rows that fit the KV budget form a
  group whose prompts are prefilled (a chunk per turn) and joined to the batch; one decode step
  runs every row; each row's token becomes text on its stream, and one wake-up per step hands
  all rows' new items to the hub. A finished row leaves at once and its stream ends.

The KV budget: a batch of ``n`` rows ``w`` columns wide, whose rows may still make ``r_i``
tokens, never holds more than ``n * w + sum(r_i)`` cache columns (rows leave as they finish,
the width grows by one a step), so a group is admitted only while that bound, with the group
joined, stays within ``max_batch_tokens``; otherwise it waits for rows to leave, first come
first served.

A step that raises fails the rows it ran (their streams end with the error) and the loop goes
on with the others: a failed prefill ends its group only, a failed decode step the batch.

Importing this module does not import torch: the loop imports :mod:`.batch` and
:mod:`.sampling` on its thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..concurrency import raw_lock
from ..errors import RequestError
from .metrics import StepMeter
from .params import GenerationParams
from .rows import Row, RowStream, Wakeup, make_wakeup

if TYPE_CHECKING:
    from ..metrics import LLMMetrics

__all__ = ["BatchScheduler", "eos_token_ids"]


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


class BatchScheduler:
    """Serve ``model`` to many streams at once, decoding up to ``max_batch`` of them together.

    ``executor`` must run the loop on the thread where all of the device's torch work happens
    (:func:`~flask_sse_run.thread_executor` ``(1)``). ``prefill_chunk`` bounds the prompt
    tokens prefilled per turn, so a long prompt delays the running rows by one chunk at a time.
    ``metrics`` (:func:`flask_sse_run.metrics.llm_metrics`) gets the batch's rows after every
    step, set from the streams' side (the hub), never from the loop's thread.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        executor: concurrent.futures.Executor,
        max_batch: int = 16,
        max_queue: int = 8,
        max_batch_tokens: int = 32768,
        prefill_chunk: int = 512,
        retry_after: int = 5,
        logger: logging.Logger | None = None,
        metrics: LLMMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or max_batch_tokens < 2 or prefill_chunk < 1 or retry_after < 0:
            raise ValueError(
                "need max_batch >= 1, max_queue >= 0, max_batch_tokens >= 2, prefill_chunk >= 1 "
                "and retry_after >= 0"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.retry_after = retry_after
        self.logger = logger or logging.getLogger("flask_sse_run.llm")
        self.metrics = metrics
        self.meter = StepMeter()
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)
        self._executor = executor
        # An OS lock: taken by the loop's thread and by the streams' greenlets (never for long).
        self._lock = raw_lock()
        self._reserved = 0  # admitted, stream not started yet
        self._waiting: deque[Row] = deque()
        self._in_batch = 0  # rows prefilling or decoding
        self._looping = False
        self._wakeup: Wakeup | None = None
        # The loop's own state (only its thread touches it).
        self._batch: Any = None  # a DecodeBatch
        self._prefill: Any = None  # a Prefill
        self.steps = 0  # decode steps run
        self.prefills = 0  # groups prefilled
        self.kv_tokens = 0

    # -- the streams' side -------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Rows in the batch (prefilling or decoding)."""
        return self._in_batch

    @property
    def waiting(self) -> int:
        """Admitted rows not in the batch yet."""
        return self._reserved + len(self._waiting)

    @property
    def wakeups(self) -> int:
        """How many times the loop has woken the streams (one per step that made items)."""
        return 0 if self._wakeup is None else self._wakeup.calls

    def admit(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        *,
        started: float,
        on_finish: Callable[[dict[str, Any]], object] | None = None,
    ) -> RowStream:
        """Take a place for a request, or raise :class:`RequestError` (503, or 422: never fits).

        Call it before the response starts, on the thread that will iterate the stream.
        """
        need = len(prompt_ids) + params.max_new_tokens
        if need > self.max_batch_tokens:
            # The rule and the room left, never the client's value.
            room = self.max_batch_tokens - len(prompt_ids)
            rule = (
                f"the prompt and the new tokens must fit this server's KV cache of "
                f"{self.max_batch_tokens} tokens a request (FALCON_MAX_BATCH_TOKENS)"
            )
            msg = f"must be at most {room} for this prompt ({len(prompt_ids)} tokens): {rule}"
            loc = "max_new_tokens"
            if room < 1:
                loc, msg = "prompt", f"is {len(prompt_ids)} tokens: {rule}"
            detail = [{"loc": [loc], "msg": msg, "type": "too_long"}]
            raise RequestError(422, "invalid parameters", detail)
        with self._lock:
            taken = self._reserved + len(self._waiting) + self._in_batch
            if taken >= self.max_batch + self.max_queue:
                running, waiting = self._in_batch, self._reserved + len(self._waiting)
                refused = True
            else:
                self._reserved += 1
                refused = False
        if refused:
            raise RequestError(
                503,
                f"the model is busy: {running} generating, {waiting} waiting; retry later",
                headers={"Retry-After": str(self.retry_after)},
            )
        if self._wakeup is None:
            # Here: on the hub, in the worker.
            self._wakeup = make_wakeup(None if self.metrics is None else self._report_rows)
        row = Row(prompt_ids, params, self.tokenizer, self.eos_ids, started)
        row.stage = "reserved"
        return RowStream(self, row, self._wakeup, on_finish)

    def submit(self, row: Row) -> None:
        """Queue ``row`` (its stream's first ``next()``); start the loop if it is not running."""
        with self._lock:
            self._reserved -= 1
            self._waiting.append(row)
            row.stage = "waiting"
            start, self._looping = not self._looping, True
        if start:
            try:
                self._executor.submit(self._loop)
            except BaseException as exc:  # the executor is shut down: nothing will run it
                with self._lock:
                    self._looping = False
                    failed = list(self._waiting)
                    self._waiting.clear()
                for waiting in failed:
                    waiting.fail(exc)
                self._notify(failed)
                raise

    def withdraw(self, row: Row) -> bool:
        """Take ``row`` out if it has not reached the batch (True); False: the loop has it."""
        with self._lock:
            if row.stage == "reserved":
                self._reserved -= 1
            elif row.stage == "waiting":
                self._waiting.remove(row)
            else:
                return False
            row.stage = "withdrawn"
            return True

    def _report_rows(self) -> None:
        # On the hub, once per step's wake-up: the rows in the batch after that step. A failing
        # metrics directory must not break the wake-up's callback.
        assert self.metrics is not None
        try:
            self.metrics.batch_rows.set(self._in_batch)
        except Exception:
            self.logger.exception("the batch's rows could not be recorded")

    def health(self) -> dict[str, Any]:
        """The batch's figures: rows running and waiting, limits, KV columns held, steps,
        prefills and wake-ups so far, steps and tokens per second over the last minute."""
        return {
            "rows": self.running,
            "waiting": self.waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "kv_tokens": self.kv_tokens,
            "max_batch_tokens": self.max_batch_tokens,
            "steps": self.steps,
            "prefills": self.prefills,
            "wakeups": self.wakeups,
            **self.meter.rates(),
        }

    # -- the loop (on the device's thread) ---------------------------------------------------

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                try:
                    if not self._turn():
                        return
                except BaseException as exc:
                    # Not a step's error (those are handled in _turn): fail what the loop holds.
                    self.logger.exception("the decode loop failed; its rows end with the error")
                    rows = [row for row in self._drop_all() if not row.finished]
                    self._end([(row, exc) for row in rows])
                    self._notify(rows)
                    if not isinstance(exc, Exception):
                        with self._lock:
                            self._looping = False
                        raise

    def _drop_all(self) -> list[Row]:
        rows: list[Row] = []
        if self._batch is not None:
            rows += self._batch.rows
        if self._prefill is not None:
            rows += self._prefill.rows
        self._batch = self._prefill = None
        self.kv_tokens = 0
        return rows

    def _turn(self) -> bool:
        """One turn of the loop; False once there is nothing left to do (the loop has ended)."""
        from .batch import Prefill
        from .sampling import RowSampler

        self._leave_cancelled()
        with self._lock:
            group = self._take_group() if self._prefill is None else []
            if self._batch is None and self._prefill is None and not group:
                self._looping = False
                self.kv_tokens = 0
                return False
        if group:
            try:
                for row in group:
                    row.begin()
                    row.sampler = RowSampler(row, self.model.config.vocab_size, self.model.device)
                self._prefill = Prefill(self.model, group, self.pad_id, self.prefill_chunk)
            except Exception as exc:
                self._fail(group, exc, "preparing a prefill")
        if self._prefill is not None:
            self._prefill_chunk()
        if self._batch is not None:
            self._decode_step()
        self.kv_tokens = (0 if self._batch is None else self._batch.kv_tokens) + (
            0 if self._prefill is None else len(self._prefill.rows) * self._prefill.done
        )
        return True

    def _take_group(self) -> list[Row]:
        """Waiting rows that fit now, first come first served (called with the lock held)."""
        batch = self._batch
        rows = 0 if batch is None else len(batch)
        width = 0 if batch is None else batch.width
        remaining = 0 if batch is None else sum(row.remaining for row in batch.rows)
        group: list[Row] = []
        while self._waiting and rows + len(group) < self.max_batch:
            candidate = [*group, self._waiting[0]]
            longest = max(len(row.prompt_ids) for row in candidate)
            real = sum(len(row.prompt_ids) for row in candidate)
            # Prompts of very different lengths wait for the next group rather than pad a lot.
            if group and len(candidate) * longest > 2 * real + self.prefill_chunk:
                break
            columns = max(1, self.prefill_chunk // len(candidate))
            steps = -(-longest // columns)  # the batch grows by one column a step meanwhile
            joined_width = max(width + steps, longest) if rows else longest
            bound = (rows + len(candidate)) * joined_width + remaining
            bound += sum(row.params.max_new_tokens for row in candidate)
            if bound > self.max_batch_tokens:
                break
            row = self._waiting.popleft()
            row.stage = "running"
            group.append(row)
        self._in_batch += len(group)
        return group

    def _leave_cancelled(self) -> None:
        """Rows whose stream was closed or cancelled since the last step leave now."""
        for part in (self._batch, self._prefill):
            if part is None or not any(row.cancelled for row in part.rows):
                continue
            left = [row for row in part.rows if row.cancelled]
            self._end([(row, None) for row in left])  # first: whatever happens to the cache
            self._notify(left)
            keep = [i for i, row in enumerate(part.rows) if not row.cancelled]
            if keep:
                part.filter(keep)
            elif part is self._batch:
                self._batch = None
            else:
                self._prefill = None

    def _prefill_chunk(self) -> None:
        prefill = self._prefill
        try:
            logits = prefill.advance()
            if logits is None:
                return
            from .sampling import choose_tokens

            tokens = choose_tokens(logits, prefill.rows)
            joined = prefill.to_batch(tokens)
        except Exception as exc:
            self._prefill = None
            self._fail(prefill.rows, exc, "a prefill")
            return
        self._prefill = None
        self.prefills += 1
        keep = self._accept(joined.rows, tokens, count_step=False)
        if not keep:
            return
        try:
            if len(keep) < len(joined):
                joined.filter(keep)
            if self._batch is None:
                self._batch = joined
            else:
                self._batch.concatenate(joined)
        except Exception as exc:  # a half-made concatenation spoils both caches
            rows = list(joined.rows) + ([] if self._batch is None else list(self._batch.rows))
            self._batch = None
            self._fail([row for row in rows if not row.finished], exc, "joining the batch")

    def _decode_step(self) -> None:
        batch = self._batch
        try:
            from .sampling import choose_tokens

            tokens = choose_tokens(batch.step(), batch.rows)
        except Exception as exc:
            self._batch = None  # its cache may be half-updated: none of its rows can go on
            self._fail(batch.rows, exc, "a decode step")
            return
        self.steps += 1
        rows = batch.rows
        keep = self._accept(rows, tokens, count_step=True)
        if not keep:
            self._batch = None
            return
        if len(keep) < len(rows):
            batch.filter(keep)
        batch.push([tokens[i] for i in keep])

    def _accept(self, rows: Sequence[Row], tokens: Sequence[int], *, count_step: bool) -> list[int]:
        """Hand each row its token; wake their streams once; return the indices of rows going on."""
        keep: list[int] = []
        done: list[tuple[Row, BaseException | None]] = []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            try:
                if row.accept(token):
                    done.append((row, None))
                else:
                    keep.append(i)
            except Exception as exc:  # its text could not be made: only this row fails
                self.logger.error("a row failed on token %d: %r", token, exc)
                done.append((row, exc))
        self.meter.record(len(rows), steps=1 if count_step else 0)
        self._end(done)
        self._notify(rows)
        return keep

    def _fail(self, rows: Sequence[Row], exc: Exception, what: str) -> None:
        self.logger.error("%s failed; its %d rows end with the error: %r", what, len(rows), exc)
        self._end([(row, exc) for row in rows])
        self._notify(rows)

    def _end(self, rows: Sequence[tuple[Row, BaseException | None]]) -> None:
        """End ``rows`` (with their error, if any), their places given back first: a client that
        has read its summary may send its next request at once, and must find the place free."""
        self._release([row for row, _ in rows])
        for row, error in rows:
            if error is None:
                try:
                    row.finish()
                except Exception as exc:  # the held-back text could not be decoded
                    row.fail(exc)
            else:
                row.fail(error)

    def _release(self, rows: Sequence[Row]) -> None:
        if rows:
            with self._lock:
                self._in_batch -= len(rows)

    def _notify(self, rows: Sequence[Row]) -> None:
        if rows and self._wakeup is not None:
            self._wakeup.notify(rows)
