"""The serial path: one ``generate()`` per stream, in a real OS thread.

The service uses it with ``batching=False`` (``FALCON_BATCHING=0``) and for models whose cache
cannot be batched; otherwise streams are rows of :mod:`.scheduler`'s batch. Imports torch and
transformers: import it lazily (:mod:`flask_sse_run.llm.service` does, when a model is loaded).

How a token travels: ``model.generate()`` runs in a native thread (:func:`run_in_thread`, on the
executor given: one dedicated thread per device). For each new token it calls the streamer's
``put`` in that thread, which decodes it incrementally, holds back text that may start a stop
string and ``channel.send``-s the piece; the streaming greenlet wakes and writes it to the client.
A :class:`~transformers.StoppingCriteria` ends ``generate()`` at the next token once the channel
is closed (client gone, stream cancelled) or a stop string was reached.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from ..extras import missing_extra

try:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer
except ImportError as error:
    raise missing_extra("llm", error) from error

from ..streaming import close_iterator
from ..threads import StreamClosed, ThreadChannel, run_in_thread
from .detokenize import IncrementalDetokenizer
from .params import GenerationParams
from .rows import per_output_token_ms
from .scheduler import eos_token_ids
from .stops import StopStrings

__all__ = ["stream_text"]


class _ChannelStreamer(BaseStreamer):
    """Runs in the generation thread: token ids in, text pieces out through the channel."""

    def __init__(
        self, channel: ThreadChannel[dict[str, Any]], detokenizer: IncrementalDetokenizer, stops: StopStrings
    ) -> None:
        self.channel = channel
        self.detokenizer = detokenizer
        self.stops = stops
        self.prompt_seen = False
        # Tokens computed once the stream was closed (the client left): counted here, in the
        # generation thread, where the close is seen; the greenlet only learns it afterwards.
        self.after_close = 0
        self.generated = 0  # the tokens streamed: those before the stop string or the close
        self.pieces = 0
        self.last_token: int | None = None
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt's ids
            self.prompt_seen = True
            return
        if self.channel.closed:
            self.after_close += 1
            return  # computed before the stopping criteria ended generate(): not streamed
        if self.stops.stopped:
            return
        token = int(value.reshape(-1)[0])
        self.generated += 1
        self.last_token = token
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.send_text(self.stops.feed(self.detokenizer.push(token)))

    def send_text(self, text: str) -> None:
        if text:
            try:
                self.channel.send({"text": text, "index": self.pieces})
            except StreamClosed:  # closed between the check in put() and now: same as closed
                return
            self.pieces += 1

    def end(self) -> None:
        if not self.stops.stopped and not self.channel.closed:
            self.send_text(self.stops.feed(self.detokenizer.flush()))
            self.send_text(self.stops.flush())


class _StopWhen(StoppingCriteria):
    """True (stop) once the stream is closed or a stop string was reached."""

    def __init__(self, streamer: _ChannelStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stop = self.streamer.channel.closed or self.streamer.stops.stopped
        flags = torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, flags)


def stream_text(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    *,
    executor: concurrent.futures.Executor,
    started: float | None = None,
    on_finish: Callable[[dict[str, Any]], object] | None = None,
) -> Iterator[dict[str, Any]]:
    """Generate a continuation of ``prompt_ids``; yield ``{"text", "index"}`` pieces, then a summary.

    The last item is ``{"finish_reason": "length"|"stop"|"eos"|"cancelled",
    "generated_tokens": n, "prompt_tokens": n, "time_to_first_token_ms": ..., "tokens_per_s": ...}``:
    time to first token counts from ``started`` (a ``time.perf_counter()`` value, default: now),
    so it includes any wait in a queue; tokens per second count from the start of ``generate()``.
    The prompt is not echoed. ``on_finish`` is called in the consuming greenlet once the
    generation thread has ended, with the summary plus ``tokens_after_cancel`` (tokens generated
    after the stream was closed; 0 unless cancelled), ``queue_ms`` (waiting for the device) and
    ``time_per_output_token_ms``. Give every call for one device the same single-thread
    ``executor`` (:func:`~flask_sse_run.thread_executor`): torch then runs on one thread only.
    """
    started = time.perf_counter() if started is None else started
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    state: dict[str, Any] = {}

    def work(channel: ThreadChannel[dict[str, Any]]) -> None:
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        streamer = _ChannelStreamer(channel, detokenizer, StopStrings(params.stop))
        state["streamer"] = streamer
        # Sampling draws from torch's global generator: seed it for every generation, from the
        # request or at random (so one request's seed does not make the next one predictable).
        # With one generation at a time per device (concurrency 1) nothing else draws in between;
        # the batched path (scheduler.py) gives each row its own generator instead.
        torch.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
        generate_started = time.perf_counter()
        try:
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhen(streamer)]),
                pad_token_id=pad_id,
                **params.generate_kwargs(),
            )
        finally:  # the summary is recorded however generate() ended
            _summarize(state, streamer, channel, eos_ids, started, generate_started, len(prompt_ids))
        try:
            channel.send(state["summary"])
        except StreamClosed:
            pass  # the client left: the summary is still recorded (on_finish)

    return _consume(run_in_thread(work, executor=executor, maxsize=1024), state, on_finish)


def _summarize(
    state: dict[str, Any],
    streamer: _ChannelStreamer,
    channel: ThreadChannel[dict[str, Any]],
    eos_ids: set[int],
    started: float,
    generate_started: float,
    prompt_tokens: int,
) -> None:
    """Record the generation's summary in ``state`` (in the generation thread)."""
    ended = time.perf_counter()
    if channel.closed:
        reason = "cancelled"
    elif streamer.stops.stopped:
        reason = "stop"
    elif streamer.last_token in eos_ids:
        reason = "eos"
    else:
        reason = "length"
    first = streamer.first_token_at
    state["summary"] = {
        "finish_reason": reason,
        "generated_tokens": streamer.generated,
        "prompt_tokens": prompt_tokens,
        "time_to_first_token_ms": None if first is None else round((first - started) * 1000, 2),
        "tokens_per_s": round(streamer.generated / max(ended - generate_started, 1e-9), 2),
    }
    # For on_finish only (not streamed): the wait for the device, the time per token after the first.
    state["timing"] = {
        "queue_ms": round((generate_started - started) * 1000, 2),
        "time_per_output_token_ms": per_output_token_ms(first, ended, streamer.generated),
    }


def _consume(
    items: Iterator[dict[str, Any]],
    state: dict[str, Any],
    on_finish: Callable[[dict[str, Any]], object] | None,
) -> Iterator[dict[str, Any]]:
    finished = False
    try:
        for item in items:
            finished = "finish_reason" in item
            yield item
        if not finished and "summary" in state:
            # The stream's cancel token stopped the thread before it could send its summary
            # (a graceful shutdown): say so while the client may still be reading.
            finished = True
            yield state["summary"]
    finally:
        streamer: _ChannelStreamer | None = state.get("streamer")
        close_iterator(items)  # returns once the generation thread has ended (cooperatively)
        if on_finish is not None and streamer is not None and "summary" in state:
            summary = dict(state["summary"])
            summary["tokens_after_cancel"] = streamer.after_close
            summary.update(state["timing"])
            on_finish(summary)
