"""One model served to many streams: loading, admission, generation and its statistics.

:class:`GenerationService` owns a model's life in a worker process:

* **Loading** starts with :meth:`~GenerationService.start` (a gunicorn ``post_worker_init``
  hook calls it) or on first use, on the device's dedicated OS thread, so the worker serves
  other endpoints meanwhile. It happens once per process: the state is keyed by the pid, so a
  ``--preload``-ed master that built the app never loads the model (nor touches torch, whose
  threads would deadlock the forked workers), and each worker loads its own.
* **Admission**, before the response starts: 503 while the model is disabled, loading or
  failed; 422 when the prompt does not fit the model's context; 503 with ``Retry-After`` when
  the :class:`~flask_sse_run.llm.admission.DeviceQueue` is full.
* **Generation** waits for its turn in the stream, then runs
  :func:`~flask_sse_run.llm.generation.stream_text` on the dedicated thread.

Nothing here imports torch: the generation module is imported once a model has loaded.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..concurrency import gevent_patched, thread_executor
from ..errors import RequestError
from .admission import DeviceQueue, Ticket
from .loading import LoadedModel, import_runtime, load_pretrained
from .params import GenerationParams

__all__ = ["GenerationService"]

Loader = Callable[[str, Callable[[str], object]], LoadedModel]


@dataclass
class _Process:
    """What one process holds: rebuilt after a fork."""

    pid: int
    executor: Any
    started: float = field(default_factory=time.perf_counter)
    loaded: LoadedModel | None = None
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


class GenerationService:
    """Serve ``source`` (a hub id or a local directory; ``None``: disabled) to text streams.

    ``concurrency`` generations run at a time (each on its own OS thread), ``max_queue`` more
    wait, the rest get 503 with ``Retry-After: retry_after``. ``disabled_hint`` ends the 503
    message while no model is configured (say how to enable it). ``loader`` is
    :func:`~flask_sse_run.llm.loading.load_pretrained` unless a test gives another.
    """

    def __init__(
        self,
        source: str | None,
        *,
        concurrency: int = 1,
        max_queue: int = 8,
        retry_after: int = 5,
        disabled_hint: str = "configure a model to enable it",
        loader: Loader = load_pretrained,
        prepare: Callable[[], object] = import_runtime,
        logger: logging.Logger | None = None,
    ) -> None:
        self.source = source or None
        self.queue = DeviceQueue(concurrency, max_queue, retry_after)
        self.disabled_hint = disabled_hint
        self.logger = logger or logging.getLogger("flask_sse_run.llm")
        self._loader = loader
        self._prepare = prepare
        self._process: _Process | None = None
        self.finished: Counter[str] = Counter()
        self.tokens_generated = 0
        self.last_generation: dict[str, Any] | None = None

    # -- loading -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading the model in this process, unless it has begun already (idempotent).

        Call it in the worker after the fork; a ``--preload`` master must not.
        """
        if self.source is None or (self._process is not None and self._process.pid == os.getpid()):
            return
        process = _Process(pid=os.getpid(), executor=thread_executor(self.queue.concurrency, name="llm"))
        self._process = process
        self.finished, self.tokens_generated, self.last_generation = Counter(), 0, None
        self.logger.info("pid %d: importing torch and transformers", process.pid)
        try:
            self._prepare()
        except Exception as exc:
            hint = (
                "under gevent, import them before it patches (gunicorn.conf.py's post_fork hook does)"
                if gevent_patched()
                else "install the llm extra: pip install 'flask-sse-run[llm]'"
            )
            process.error = f"{type(exc).__name__}: {exc}; {hint}"
            self.logger.error("cannot load model %s: %s", self.source, process.error)
            return
        self.logger.info("pid %d: loading model %s in a background thread", process.pid, self.source)
        process.executor.submit(self._load, process)

    def _load(self, process: _Process) -> None:
        # Runs on the device's thread: the model's first torch work happens where all of it will.
        try:
            loaded = self._loader(self.source or "", self.logger.info)
        except BaseException as exc:
            process.error = f"{type(exc).__name__}: {exc}"[:1000]
            self.logger.exception("loading model %s failed", self.source)
        else:
            process.loaded = loaded

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
                running=self.queue.running,
                waiting=self.queue.waiting,
                concurrency=self.queue.concurrency,
                max_queue=self.queue.max_queue,
                finished=dict(self.finished),
                tokens_generated=self.tokens_generated,
                last_generation=self.last_generation,
            )
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
        """Admit a request and return its stream (see :func:`~.generation.stream_text`).

        Raises :class:`RequestError` before anything is streamed: 503 (no model, loading,
        failed, queue full with ``Retry-After``), 422 (the prompt does not fit the context).
        """
        received = time.perf_counter()
        process, loaded = self._ready()
        prompt_ids = list(loaded.tokenizer.encode(prompt))
        self._check_length(len(prompt_ids), params, loaded.context)
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
            raise refuse(
                "max_new_tokens",
                f"the prompt ({prompt_tokens} tokens) and max_new_tokens ({params.max_new_tokens}) "
                f"exceed the model's context of {context} tokens",
            )

    def _record(self, summary: dict[str, Any]) -> None:
        self.finished[summary["finish_reason"]] += 1
        self.tokens_generated += summary["generated_tokens"]
        self.last_generation = summary
        self.logger.info(
            "generation finished: %s after %d tokens (%d computed after the client left), "
            "first token in %s ms, %.1f tokens/s",
            summary["finish_reason"],
            summary["generated_tokens"],
            summary["tokens_after_cancel"],
            summary["time_to_first_token_ms"],
            summary["tokens_per_s"],
        )
