"""One model served to many streams: loading, admission, generation and its statistics.

:class:`GenerationService` owns a model's life in a worker process:

* **Loading** starts with :meth:`~GenerationService.start` (a gunicorn ``post_worker_init``
  hook calls it) or on first use. torch and transformers are imported, and the model loaded, on
  the device's dedicated OS thread, so the worker serves other endpoints meanwhile (under
  gevent, only huggingface_hub's HTTP client is imported on the hub first: a few tenths of a
  second). It happens once per process: the state is keyed by the pid, so a ``--preload``-ed
  master that built the app never loads the model (nor touches torch, whose threads would
  deadlock the forked workers), and each worker loads its own.
* **Admission**, before the response starts: 503 while the model is disabled, loading or
  failed; 422 when the prompt does not fit the model's context; 503 with ``Retry-After`` when
  every row runs and the queue is full. A long prompt is tokenized off the hub, a bounded
  number at once (:class:`~flask_sse_run.llm.tokenizing.PromptGate`).
* **Generation**: by default every stream is a row of one batch decoded step by step
  (:class:`~flask_sse_run.llm.scheduler.BatchScheduler`); with ``batching=False``, one
  ``generate()`` per stream, ``concurrency`` at a time
  (:func:`~flask_sse_run.llm.generation.stream_text` and a
  :class:`~flask_sse_run.llm.admission.DeviceQueue`).

Nothing here imports torch: the modules that do are imported once a model has loaded.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..concurrency import gevent_patched, thread_executor
from ..errors import RequestError
from .admission import DeviceQueue, Ticket
from .loading import LoadedModel, import_hub_client, import_runtime, load_pretrained
from .params import GenerationParams
from .scheduler import BatchScheduler
from .tally import GenerationTally
from .tokenizing import PromptGate

if TYPE_CHECKING:
    from ..metrics import LLMMetrics

__all__ = ["INSTALL_HINT", "GenerationService"]

Loader = Callable[[str, Callable[[str], object]], LoadedModel]

#: What to run when torch or transformers are missing: the ``llm`` extra, as installed or from a
#: checkout.
INSTALL_HINT = (
    "install the llm extra: pip install 'flask-sse-run[llm]' (from a checkout: pip install -e '.[llm]')"
)


@dataclass
class _Process:
    """What one process holds: rebuilt after a fork."""

    pid: int
    executor: Any
    started: float = field(default_factory=time.perf_counter)
    step: str = "importing torch and transformers"
    loaded: LoadedModel | None = None
    scheduler: BatchScheduler | None = None
    error: str | None = None


class _TicketStream:
    """The stream of one admitted request: waits for its turn, always gives the ticket back.

    A class rather than a generator: a generator that never started ignores ``close()``, and
    the ticket of a request whose client left before the first byte would then leak.
    """

    def __init__(self, ticket: Ticket, generate: Callable[[], Iterator[dict[str, Any]]]) -> None:
        self._ticket = ticket
        self._generate = generate
        self._items: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> _TicketStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._items is None:
            self._ticket.wait()
            self._items = self._generate()
        try:
            return next(self._items)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
        finally:
            self._ticket.release()


class GenerationService(GenerationTally):
    """Serve ``source`` (a hub id or a local directory; ``None``: disabled) to text streams.

    With ``batching`` (the default), up to ``max_batch`` streams decode together on the
    device's thread, ``max_queue`` more wait, the rest get 503 with ``Retry-After:
    retry_after``; the rows' KV cache is bounded by ``max_batch_tokens`` tokens (a request that
    could never fit gets 422), and prompts are prefilled ``prefill_chunk`` tokens per step. A
    model whose cache cannot be batched (not plain ``DynamicLayer`` s) falls back to one
    ``generate()`` at a time. Without ``batching``, ``concurrency`` ``generate()`` calls run at
    a time, each on its own OS thread. Prompts longer than 16 KiB are tokenized off the hub,
    ``max_tokenizing`` at once; ``max_queue`` more wait their turn, the rest get 503.
    ``disabled_hint`` ends the 503 message while no model is configured (say how to enable it).
    ``loader`` is
    :func:`~flask_sse_run.llm.loading.load_pretrained` unless a test gives another; ``prepare``
    imports torch and transformers (on the device's thread). ``metrics``
    (:func:`flask_sse_run.metrics.llm_metrics`, when the app has ``SSE_RUN_METRICS`` on) records
    each generation's queueing, time to first token, time per output token, tokens and tokens
    computed after a cancel, and the batch's rows at each step. Raises :class:`ValueError` for a
    limit out of range.
    """

    def __init__(
        self,
        source: str | None,
        *,
        batching: bool = True,
        max_batch: int = 16,
        max_batch_tokens: int = 32768,
        prefill_chunk: int = 512,
        concurrency: int = 1,
        max_queue: int = 8,
        max_tokenizing: int = 2,
        retry_after: int = 5,
        disabled_hint: str = "configure a model to enable it",
        loader: Loader = load_pretrained,
        prepare: Callable[[], object] = import_runtime,
        logger: logging.Logger | None = None,
        metrics: LLMMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_batch_tokens < 2 or prefill_chunk < 1:
            raise ValueError("need max_batch >= 1, max_batch_tokens >= 2 and prefill_chunk >= 1")
        self.source = source or None
        self.batching = batching
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.queue = DeviceQueue(concurrency, max_queue, retry_after)
        self.prompts = PromptGate(max_tokenizing, max_queue, retry_after)
        self.disabled_hint = disabled_hint
        self.logger = logger or logging.getLogger("flask_sse_run.llm")
        self.metrics = metrics
        self._loader = loader
        self._prepare = prepare
        self._process: _Process | None = None
        self.reset_tally()

    # -- loading -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading the model in this process, unless it has begun already (idempotent).

        Call it in the worker after the fork (a ``--preload`` master must not), on the thread
        that serves requests. Returns at once: the import and the loading run on the device's
        thread.
        """
        if self.source is None or (self._process is not None and self._process.pid == os.getpid()):
            return
        threads = 1 if self.batching else self.queue.concurrency
        process = _Process(pid=os.getpid(), executor=thread_executor(threads, name="llm"))
        self._process = process
        self.reset_tally()
        if gevent_patched():
            try:
                import_hub_client()  # under gevent it must run here, on the hub's thread
            except Exception as exc:
                self._failed_import(process, exc)
                return
        self.logger.info("pid %d: importing torch and transformers in a background thread", process.pid)
        process.executor.submit(self._load, process)

    def _failed_import(self, process: _Process, exc: BaseException) -> None:
        hint = f"; {INSTALL_HINT}" if isinstance(exc, ImportError) else ""
        process.error = f"{type(exc).__name__}: {exc}{hint}"
        self.logger.error("cannot load model %s: %s", self.source, process.error)

    def _load(self, process: _Process) -> None:
        # Runs on the device's thread: the model's first torch work happens where all of it will.
        began = time.perf_counter()
        try:
            self._prepare()
        except BaseException as exc:
            self._failed_import(process, exc)
            return
        self.logger.info(
            "pid %d: imported torch and transformers in %.1f s; loading model %s",
            process.pid,
            time.perf_counter() - began,
            self.source,
        )
        process.step = "loading the model"
        try:
            loaded = self._loader(self.source or "", self.logger.info)
            if self.batching:
                process.scheduler = self._scheduler(loaded, process)
        except BaseException as exc:
            process.error = f"{type(exc).__name__}: {exc}"[:1000]
            self.logger.exception("loading model %s failed", self.source)
            return
        # torch's, transformers' and the model's objects live as long as the process: out of
        # the collector's sight, as gunicorn.conf.py does with the app's. Otherwise each full
        # collection scans them all (0.2 s with torch imported), the worker stopped meanwhile.
        gc.freeze()
        process.loaded = loaded

    def _scheduler(self, loaded: LoadedModel, process: _Process) -> BatchScheduler | None:
        from .batch import check_model  # torch: imported by now

        try:
            check_model(loaded.model)
        except TypeError as exc:
            self.logger.warning("batched decoding is off (%s): one generate() at a time", exc)
            return None
        return BatchScheduler(
            loaded.model,
            loaded.tokenizer,
            executor=process.executor,
            max_batch=self.max_batch,
            max_queue=self.queue.max_queue,
            max_batch_tokens=self.max_batch_tokens,
            prefill_chunk=self.prefill_chunk,
            retry_after=self.queue.retry_after,
            logger=self.logger,
            metrics=self.metrics,
        )

    @property
    def status(self) -> str:
        """``"disabled"``, ``"loading"``, ``"ready"`` or ``"failed"``."""
        if self.source is None:
            return "disabled"
        process = self._current()
        if process.loaded is not None:
            return "ready"
        return "failed" if process.error is not None else "loading"

    def _current(self) -> _Process:
        self.start()
        assert self._process is not None
        return self._process

    @property
    def running(self) -> int:
        """Generations running in this process (rows in the batch, or ``generate()`` calls)."""
        scheduler = self._scheduler_now()
        return scheduler.running if scheduler is not None else self.queue.running

    @property
    def waiting(self) -> int:
        """Admitted requests waiting for their turn in this process."""
        scheduler = self._scheduler_now()
        return scheduler.waiting if scheduler is not None else self.queue.waiting

    def _scheduler_now(self) -> BatchScheduler | None:
        process = self._process
        return process.scheduler if process is not None and process.pid == os.getpid() else None

    def health(self) -> dict[str, Any]:
        """The service's state, for a health endpoint (starts loading if not begun)."""
        status = self.status
        body: dict[str, Any] = {"status": status}
        if status == "disabled":
            body["message"] = f"no model is configured: {self.disabled_hint}"
            return body
        process = self._current()
        body["model"] = self.source
        if status == "loading":
            body["step"] = process.step
            body["loading_seconds"] = round(time.perf_counter() - process.started, 1)
        elif status == "failed":
            body["error"] = process.error
        elif process.loaded is not None:
            loaded = process.loaded
            body.update(
                device=loaded.device,
                dtype=loaded.dtype,
                parameters=loaded.parameters,
                context=loaded.context,
                load_seconds=loaded.load_seconds,
                running=self.running,
                waiting=self.waiting,
                max_queue=self.queue.max_queue,
                tokenizing=self.prompts.busy,
            )
            if process.scheduler is not None:
                body["batch"] = process.scheduler.health()
            else:
                body["concurrency"] = self.queue.concurrency
            body.update(self.totals())
        return body

    # -- generation --------------------------------------------------------------------------

    def _ready(self) -> tuple[_Process, LoadedModel]:
        status = self.status
        if status == "disabled":
            raise RequestError(503, f"the model is not enabled: {self.disabled_hint}")
        process = self._current()
        if status == "loading":
            raise RequestError(
                503,
                f"the model {self.source} is still loading; see the health endpoint",
                headers={"Retry-After": str(self.queue.retry_after)},
            )
        if process.loaded is None:
            raise RequestError(503, f"the model {self.source} failed to load: {process.error}")
        return process, process.loaded

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[dict[str, Any]]:
        """Admit a request and return its stream of ``{"text", "index"}`` items, then a summary.

        The summary is ``{"finish_reason": "length"|"stop"|"eos"|"cancelled",
        "generated_tokens", "prompt_tokens", "time_to_first_token_ms", "tokens_per_s"}``; the time to first
        token counts from this call. Raises :class:`RequestError` before anything is streamed:
        503 (no model, loading, failed, queue full or too many long prompts being tokenized, with
        ``Retry-After``), 422 (the prompt does not fit the context, or the KV budget).
        """
        received = time.perf_counter()
        process, loaded = self._ready()
        prompt_ids = self._encode(loaded, prompt)
        self._check_length(len(prompt_ids), params, loaded.context)
        if process.scheduler is not None:
            return process.scheduler.admit(prompt_ids, params, started=received, on_finish=self._record)
        ticket = self.queue.admit()

        def generate() -> Iterator[dict[str, Any]]:
            from .generation import stream_text  # torch: imported once a model is loaded

            return stream_text(
                loaded.model,
                loaded.tokenizer,
                prompt_ids,
                params,
                executor=process.executor,
                started=received,
                on_finish=self._record,
            )

        return _TicketStream(ticket, generate)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str | None:
        """The prompt the tokenizer's chat template makes of ``messages``, the assistant's turn
        opened (``add_generation_prompt``); ``None`` when the tokenizer has no template.

        Raises :class:`RequestError`: 503 as :meth:`stream` does while the model is not ready,
        400 when the template refuses the messages (its own message, e.g. roles that do not
        alternate).
        """
        _, loaded = self._ready()
        tokenizer = loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return None
        size = sum(len(str(message.get("content") or "")) for message in messages)
        try:
            prompt = self.prompts.run(
                size,
                lambda: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
            )
        except RequestError:
            raise
        except Exception as exc:  # jinja2's TemplateError, raise_exception() in the template
            raise RequestError(400, f"messages: the model's chat template refused them: {exc}") from None
        return str(prompt)

    def max_new_tokens_for(self, prompt: str) -> int:
        """The most tokens ``prompt`` leaves room for: the model's context, and with batching the
        KV budget, minus the prompt's tokens (at least 1: :meth:`stream` then says what is wrong).

        Raises :class:`RequestError` (503) as :meth:`stream` does while the model is not ready.
        """
        process, loaded = self._ready()
        used = len(self._encode(loaded, prompt))
        room = loaded.context - used
        if process.scheduler is not None:
            room = min(room, process.scheduler.max_batch_tokens - used)
        return max(room, 1)

    def _encode(self, loaded: LoadedModel, prompt: str) -> list[int]:
        return self.prompts.run(len(prompt), lambda: list(loaded.tokenizer.encode(prompt)))

    @staticmethod
    def _check_length(prompt_tokens: int, params: GenerationParams, context: int) -> None:
        def refuse(loc: str, msg: str) -> RequestError:
            detail = [{"loc": [loc], "msg": msg, "type": "too_long"}]
            return RequestError(422, "invalid parameters", detail)

        if prompt_tokens == 0:
            raise RequestError(
                422, "invalid parameters", [{"loc": ["prompt"], "msg": "has no tokens", "type": "too_short"}]
            )
        if prompt_tokens >= context:
            raise refuse("prompt", f"is {prompt_tokens} tokens; the model's context is {context} tokens")
        if prompt_tokens + params.max_new_tokens > context:
            # The rule and the room left, never the client's value (2**70 came back, once).
            raise refuse(
                "max_new_tokens",
                f"must be at most {context - prompt_tokens} for this prompt ({prompt_tokens} tokens): "
                f"the prompt and the new tokens must fit the model's context of {context} tokens",
            )

    def _record(self, summary: dict[str, Any]) -> None:
        self.tally(summary)
        self.logger.info(
            "generation finished: %s after %d tokens (%d computed after the client left), "
            "first token in %s ms, %.1f tokens/s",
            summary["finish_reason"],
            summary["generated_tokens"],
            summary["tokens_after_cancel"],
            summary["time_to_first_token_ms"],
            summary["tokens_per_s"],
        )
