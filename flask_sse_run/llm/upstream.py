"""Stream generated text from an OpenAI-compatible engine (vLLM, TGI, ``transformers serve``).

:class:`UpstreamService` has the interface the Falcon blueprint uses from
:class:`~flask_sse_run.llm.GenerationService` (``stream(prompt, params)``, ``health()``,
``start()``) and the same events, but the model runs elsewhere: each request is one
``POST {base_url}/completions`` with ``"stream": true``, relayed with :mod:`flask_sse_run.relay`.
Nothing here imports torch or transformers: a Flask app in front of an engine needs neither.

* **Parameters.** ``max_new_tokens``, ``temperature``, ``top_p`` (when sampling), ``stop`` and
  ``seed`` are standard OpenAI fields. ``top_k``, ``repetition_penalty`` and ``min_new_tokens``
  are not: they are sent (as ``top_k``, ``repetition_penalty``, ``min_tokens``, vLLM's names)
  only when named in ``extensions``; otherwise a request that sets one to anything but its
  default is refused with 422, never silently ignored. (``top_k``'s default, 50, and 0, all
  tokens, as OpenAI samples, are not sent: the engine's own default applies.)
* **Stop strings** are also applied here, with the local service's rule (the text ends before
  the first one, even split across pieces): engines differ on whether they strip it.
* **Refusals.** The engine's 4xx keeps its status and message and comes before the stream
  starts; an unreachable engine is 503, its 5xx 502 (see :func:`~flask_sse_run.relay.check_response`).
  A failure mid-stream (the engine killed, a stream ending before its finish reason, an error
  chunk) becomes one ``error`` event with the reason.
* **Cancellation.** When the client leaves, the upstream response is closed; the engine sees
  the disconnect and aborts the generation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Generator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError, RequestError, UpstreamError
from ..relay import (
    CONNECT_TIMEOUT,
    SILENCE_TIMEOUT,
    error_message,
    open_stream,
    read_events,
    refusal,
    shared_session,
)
from .params import GenerationParams
from .rows import per_output_token_ms
from .stops import StopStrings
from .tally import GenerationTally

if TYPE_CHECKING:
    from ..metrics import LLMMetrics

__all__ = ["EXTENSIONS", "UpstreamService"]

#: Non-OpenAI sampling fields an engine may accept (vLLM does all three), by request field.
EXTENSIONS = {"top_k": "top_k", "repetition_penalty": "repetition_penalty", "min_new_tokens": "min_tokens"}
_DEFAULTS = GenerationParams()
_ABSENT: Any = object()  # a chunk without vLLM's stop_reason field


class UpstreamService(GenerationTally):
    """Serve text streams from the OpenAI-compatible engine at ``base_url`` (``http://host:port/v1``).

    ``model`` is sent as the request's ``model`` (default: none, the engine's only model);
    ``api_key`` as a bearer token. ``extensions`` names the non-OpenAI parameters the engine
    accepts (a subset of :data:`EXTENSIONS`' keys). ``connect_timeout`` and ``silence_timeout``
    bound connecting and each wait for the engine's next byte; ``health_timeout`` bounds the
    health check's request. ``metrics`` (:func:`flask_sse_run.metrics.llm_metrics`) records each
    generation's time to first token, time per output token and tokens (the engine queues, so no
    queueing time). Raises :class:`~flask_sse_run.ConfigurationError` for a bad URL or
    extension.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        extensions: Collection[str] = (),
        connect_timeout: float = CONNECT_TIMEOUT,
        silence_timeout: float = SILENCE_TIMEOUT,
        health_timeout: float = 2.0,
        logger: logging.Logger | None = None,
        metrics: LLMMetrics | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigurationError(
                f"the upstream URL must be http(s)://host[:port][/path], not {base_url!r}"
            )
        unknown = set(extensions) - set(EXTENSIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown upstream extensions {sorted(unknown)}; known: {sorted(EXTENSIONS)}"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model or None
        self.extensions = frozenset(extensions)
        self.connect_timeout = connect_timeout
        self.silence_timeout = silence_timeout
        self.health_timeout = health_timeout
        self.logger = logger or logging.getLogger("flask_sse_run.llm")
        self.metrics = metrics
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.running = 0
        self.reset_tally()

    @property
    def source(self) -> str:
        """Where the text comes from (for logs and the health endpoint)."""
        return self.base_url

    def start(self) -> None:
        """Nothing to load: the engine holds the model (here for the blueprint's gunicorn hook)."""

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str | None:
        """``None``: no tokenizer here, so no chat template (callers use a plain fallback)."""
        return None

    def max_new_tokens_for(self, prompt: str) -> int | None:
        """``None``: the engine's context is not known here."""
        return None

    # -- health ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The engine's state, from ``GET {base_url}/models``: ``ready`` or ``failed`` with why."""
        import requests

        body: dict[str, Any] = {"upstream": self.base_url}
        began = time.perf_counter()
        try:
            response = shared_session().get(
                f"{self.base_url}/models",
                headers=self._headers,
                timeout=(self.connect_timeout, self.health_timeout),
            )
        except requests.RequestException as exc:
            # requests' message names the host and port only, never our headers (the API key).
            return {"status": "failed", **body, "error": f"the upstream is unreachable: {type(exc).__name__}"}
        latency = round((time.perf_counter() - began) * 1000, 2)
        if response.status_code != 200:
            error = refusal(response.status_code, error_message(response.content[:4096])).message
            return {"status": "failed", **body, "error": error, "latency_ms": latency}
        try:
            models = [str(m["id"]) for m in response.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return {
                "status": "failed",
                **body,
                "error": "the upstream's /models answer is not an OpenAI model list",
            }
        return {
            "status": "ready",
            **body,
            "model": self.model or (models[0] if len(models) == 1 else None),
            "models": models,
            "latency_ms": latency,
            "running": self.running,
            **self.totals(),
        }

    # -- generation --------------------------------------------------------------------------

    def request_body(self, prompt: str, params: GenerationParams) -> dict[str, Any]:
        """The ``/completions`` request for ``prompt`` and ``params``.

        Raises :class:`RequestError` (422, every problem listed) for a parameter the engine
        cannot take (see the module docstring).
        """
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "stream": True,
            # vLLM then ends with a usage chunk (the token count); others ignore it.
            "stream_options": {"include_usage": True},
        }
        if self.model is not None:
            body["model"] = self.model
        if not params.greedy:  # as for a local model: greedy decoding takes no sampling parameter
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        problems = []
        for name, value, neutral in (
            ("top_k", params.top_k, _DEFAULTS.top_k),
            ("repetition_penalty", params.repetition_penalty, 1.0),
            ("min_new_tokens", params.min_new_tokens, 0),
        ):
            if value == neutral or (name == "top_k" and (params.greedy or value == 0)):
                continue  # the default, all tokens, or greedy decoding's: nothing to send
            if name in self.extensions:
                body[EXTENSIONS[name]] = value
            else:
                msg = "the upstream engine does not take this parameter; leave it at its default"
                problems.append({"loc": [name], "msg": msg, "type": "unsupported"})
        if problems:
            raise RequestError(422, "invalid parameters", problems)
        return body

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[dict[str, Any]]:
        """Ask the engine for ``prompt``'s continuation; return the stream of its pieces.

        Items: ``{"text": ..., "index": i}`` per piece, then ``{"finish_reason": "length"|"stop"|
        "eos", "generated_tokens": n, "prompt_tokens": n, "time_to_first_token_ms": ...,
        "tokens_per_s": ...}`` (as :class:`~flask_sse_run.llm.GenerationService`; ``prompt_tokens``
        is the engine's usage count, ``None`` when it sends none before the text ends). Raises
        :class:`RequestError` before anything is streamed: 422 (parameters), the engine's 4xx, 502/503/504
        (:class:`~flask_sse_run.errors.UpstreamError`).
        """
        received = time.perf_counter()
        body = self.request_body(prompt, params)
        response = open_stream(
            f"{self.base_url}/completions",
            json=body,
            headers=self._headers,
            connect_timeout=self.connect_timeout,
            silence_timeout=self.silence_timeout,
        )
        return _CompletionStream(response, params, received, self._started, self._record)

    def _started(self) -> None:
        self.running += 1

    def _record(self, summary: dict[str, Any]) -> None:
        self.running -= 1
        self.tally(summary)
        self.logger.info(
            "upstream generation finished: %s after %d tokens, first token in %s ms, %.1f tokens/s",
            summary["finish_reason"],
            summary["generated_tokens"],
            summary["time_to_first_token_ms"],
            summary["tokens_per_s"],
        )


class _CompletionStream:
    """One relayed completion: OpenAI chunks in, the blueprint's events out.

    A class, not a generator, so that ``close()`` closes the upstream also when iteration never
    began (the client left before the first event).
    """

    def __init__(
        self,
        response: Any,
        params: GenerationParams,
        received: float,
        on_start: Callable[[], None],
        on_finish: Callable[[dict[str, Any]], None],
    ) -> None:
        self._response = response
        self._events = read_events(response)
        self._params = params
        self._received = received
        self._opened = time.perf_counter()  # the engine answered: its generation has begun
        self._on_finish = on_finish
        self._summary: dict[str, Any] | None = None
        self._pieces = 0  # text chunks received (about one per token)
        self._prompt_tokens: int | None = None  # the engine's count, if it sends its usage
        self._first: float | None = None
        self._items = self._run()
        on_start()

    def __iter__(self) -> _CompletionStream:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._items)
        except UpstreamError:
            if self._summary is None:
                self._finish("failed", None)
            raise

    def close(self) -> None:
        """Close the upstream (the engine aborts the generation) and record how it ended."""
        try:
            self._items.close()
        finally:
            self._events.close()
            if self._summary is None:  # ended before its summary: the client left, or it failed
                self._finish("cancelled", None)

    def _run(self) -> Generator[dict[str, Any], None, None]:
        stops = StopStrings(self._params.stop)
        index = 0
        reason: str | None = None
        stop_reason: Any = _ABSENT
        usage: int | None = None
        done = False
        for event in self._events:
            # Read on to the body's end after [DONE] (as OpenAI's client does): a connection
            # read to its end goes back to the pool, open, for the next stream.
            done = done or event.data == "[DONE]"
            if done:
                continue
            chunk = _chunk(event.data)
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"].get("completion_tokens", usage)
                self._prompt_tokens = chunk["usage"].get("prompt_tokens", self._prompt_tokens)
            for choice in chunk.get("choices") or ():
                text = choice.get("text") or ""
                if text and not stops.stopped:
                    self._pieces += 1
                    if self._first is None:
                        self._first = time.perf_counter()
                    piece = stops.feed(text)
                    if piece:
                        yield {"text": piece, "index": index}
                        index += 1
                if choice.get("finish_reason"):
                    reason, stop_reason = choice["finish_reason"], choice.get("stop_reason", _ABSENT)
            if stops.stopped:  # our stop string: no need for the rest (closing aborts it)
                break
        else:
            if reason is None and not done:
                raise UpstreamError(502, "the upstream stream ended before the generation finished")
        if not stops.stopped:
            tail = stops.flush()
            if tail:
                yield {"text": tail, "index": index}
        if stops.stopped:
            finish, tokens = "stop", self._pieces
        else:
            finish, tokens = (
                _finish_reason(reason, stop_reason, bool(self._params.stop)),
                usage or self._pieces,
            )
        self._events.close()
        yield self._finish(finish, tokens)

    def _finish(self, reason: str, tokens: int | None) -> dict[str, Any]:
        ended = time.perf_counter()
        generated = self._pieces if tokens is None else tokens
        first = self._first
        self._summary = {
            "finish_reason": reason,
            "generated_tokens": generated,
            "prompt_tokens": self._prompt_tokens,
            "time_to_first_token_ms": None if first is None else round((first - self._received) * 1000, 2),
            "tokens_per_s": round(generated / max(ended - self._opened, 1e-9), 2),
        }
        # Recorded, not streamed: the time per token after the first (the engine queues alone).
        recorded = {**self._summary, "time_per_output_token_ms": per_output_token_ms(first, ended, generated)}
        self._on_finish(recorded)
        return self._summary


def _chunk(data: str) -> dict[str, Any]:
    """One OpenAI chunk; an error chunk (vLLM's, ``transformers serve``'s) raises its message."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise UpstreamError(502, "the upstream sent an event that is not JSON") from None
    if not isinstance(chunk, dict):
        raise UpstreamError(502, "the upstream sent an event that is not a JSON object")
    if "error" in chunk or chunk.get("object") == "error":
        message = error_message(json.dumps(chunk).encode())
        raise UpstreamError(502, f"the upstream failed mid-stream: {message}")
    return chunk


def _finish_reason(reason: str | None, stop_reason: Any, stop_strings: bool) -> str:
    """The blueprint's finish reason for the engine's OpenAI one."""
    if reason == "length":
        return "length"
    # OpenAI's "stop" is end-of-sequence or a stop string. vLLM's stop_reason says which (None:
    # EOS); without it, and with no stop string asked for, it can only be EOS.
    if stop_reason is _ABSENT:
        return "stop" if stop_strings else "eos"
    return "eos" if stop_reason is None else "stop"
