"""OpenAI's completions API, as the LLM services speak it: request bodies, chunks, errors.

Pure: nothing here imports Flask (:mod:`.openai_views` serves it). The shapes are OpenAI's API
reference's, checked against vLLM's server (``vllm/entrypoints/openai/protocol.py``) and the
official ``openai`` SDK.

* **Request bodies** are pydantic models. A field OpenAI does not have is refused (400,
  ``Unrecognized request argument supplied``, as OpenAI answers). A field that would change the
  output and that this server does not do is refused too, never ignored: ``n`` above 1,
  ``best_of`` above 1, ``logprobs``, ``top_logprobs``, ``echo``, ``suffix``, ``logit_bias``,
  ``presence_penalty`` and ``frequency_penalty`` other than 0, ``tools``, ``tool_choice`` other
  than ``"none"``, ``functions``, ``function_call``, ``response_format`` other than text,
  ``audio``, ``modalities`` other than text, ``prediction``, ``reasoning_effort``,
  ``verbosity``, ``web_search_options``, and ``stream_options.include_obfuscation``. Fields that
  change nothing in the text are accepted and ignored: ``user``, ``metadata``, ``store``,
  ``service_tier``, ``prompt_cache_key``, ``safety_identifier``, ``parallel_tool_calls``.
  vLLM's sampling extensions ``top_k``, ``repetition_penalty`` and ``min_tokens`` are taken.
* **Streams** are ``data: {chunk}`` events ending with ``data: [DONE]``, and nothing else: no
  ``event:``, ``id:`` or ``retry:`` field. Once an ``id:`` (or a lone ``retry:``) has been
  sent, the official SDK dispatches the blank line of a keep-alive comment as an empty event
  and fails to parse it (``JSONDecodeError``); it ignores event names, so a named event with
  ``data: {}`` would reach the caller as an empty chunk. Keep-alive comments (``: ping``) are
  safe without ids. A chat stream starts with the assistant's role (``{"role": "assistant",
  "content": ""}``) at once, then one chunk per piece of text, then an empty delta with the
  ``finish_reason`` (``stop`` or ``length``), then with ``stream_options.include_usage`` the
  usage chunk (``choices: []``; the other chunks carry ``usage: null`` then).
* **Errors** are ``{"error": {"message", "type", "param", "code"}}``: before the stream with
  the HTTP status; inside it one ``data: {"error": ...}`` event then ``data: [DONE]`` (the SDK
  raises ``APIError`` with its message). Messages never echo what the client sent.

Deliberate divergences from OpenAI: validation errors are 400 with the first problem's field in
``param`` and every problem in the message (OpenAI names one); a prompt that does not fit the
context is ``context_length_exceeded``, as OpenAI's, but its message is this server's.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..binding import problem_message
from ..errors import RequestError
from ..events import encode
from .params import GenerationParams

__all__ = [
    "CHAT_STOP",
    "DONE",
    "ChatRequest",
    "ChunkStream",
    "CompletionRequest",
    "OpenAIError",
    "as_openai_error",
    "collect",
    "fallback_chat_prompt",
    "models_list",
    "parse_request",
    "stream_closer",
]

#: The event that ends every stream.
DONE = encode("[DONE]")
#: What a reply with the plain fallback template stops before: the next user turn.
CHAT_STOP = "\nUser:"
#: The most stop strings a request may give (OpenAI's limit).
MAX_STOPS = 4
#: The longest stop string: text that may start one is held back until the next piece says.
MAX_STOP_LENGTH = 256
_INT64 = 2**63

Kind = Literal["completion", "chat"]


# -- errors ------------------------------------------------------------------------------------


class OpenAIError(RequestError):
    """A refusal in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    ``type`` defaults to ``invalid_request_error`` below 500 and ``server_error`` from 500, as
    OpenAI's errors are typed.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, message, headers=headers)
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response (and of an error event in a stream)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _loc(loc: tuple[str | int, ...] | list[Any], names: Mapping[str, str]) -> str:
    """``messages[0].content`` from pydantic's or the binder's ``("messages", 0, "content")``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = names.get(str(part), str(part)) if not out else str(part)
            out += f".{name}" if out else name
    return out


def as_openai_error(exc: RequestError, names: Mapping[str, str] | None = None) -> OpenAIError:
    """``exc`` (the extension's, or a service's refusal) in OpenAI's shape.

    ``names`` maps the service's parameter names to the request's (``max_new_tokens`` to
    ``max_tokens``, ``prompt`` to ``messages``). A refusal that lists problems (422) becomes a
    400 naming every one, ``context_length_exceeded`` when one is a prompt too long; 401 is
    ``invalid_api_key``; the status and headers (``Retry-After``, ``WWW-Authenticate``) stay.
    """
    if isinstance(exc, OpenAIError):
        return exc
    names = names or {}
    if exc.detail:
        problems = [(_loc(d.get("loc", []), names), str(d.get("msg", ""))) for d in exc.detail]
        too_long = any(d.get("type") == "too_long" for d in exc.detail)
        return OpenAIError(
            400,
            "; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems),
            param=problems[0][0] or None,
            code="context_length_exceeded" if too_long else "invalid_value",
            headers=exc.headers,
        )
    code = "invalid_api_key" if exc.status == 401 else None
    return OpenAIError(exc.status, exc.message, code=code, headers=exc.headers)


def _unsupported(param: str, reason: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {reason}", param=param, code="unsupported_parameter")


# -- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    """``stream_options``: only with ``stream: true``."""

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


StopField = str | list[str] | None


class _Sampling(_Body):
    """The fields both endpoints share."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: StopField = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    # vLLM's extensions (the SDK's extra_body): the local model does them.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int | None = Field(None, ge=0)

    def refuse_unsupported(self) -> None:
        """Raise :class:`OpenAIError` (400) for a field set to what this server does not do."""
        self.stops()  # refused here, before anything is admitted
        if self.n not in (None, 1):
            raise _unsupported("n", "only 1 is supported: one choice per request")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise _unsupported(name, "is not supported; use repetition_penalty (vLLM's) instead")
        if self.logit_bias:
            raise _unsupported("logit_bias", "is not supported")
        if self.stream_options is not None:
            if not self.stream:
                raise OpenAIError(
                    400,
                    "stream_options: only allowed when stream is true",
                    param="stream_options",
                    code="invalid_value",
                )
            if self.stream_options.include_obfuscation:
                raise _unsupported("stream_options.include_obfuscation", "is not supported")

    @property
    def include_usage(self) -> bool:
        """Whether the stream ends with the usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stops(self) -> tuple[str, ...]:
        """The stop strings; raises :class:`OpenAIError` for more than four, an empty or a long one."""
        stop = self.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOPS:
            raise OpenAIError(400, f"stop: at most {MAX_STOPS} strings", param="stop", code="invalid_value")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise OpenAIError(
                400,
                f"stop: each string must hold 1 to {MAX_STOP_LENGTH} characters",
                param="stop",
                code="invalid_value",
            )
        return stops

    def params(self, max_new_tokens: int, extra_stops: tuple[str, ...] = ()) -> GenerationParams:
        """The generation parameters, OpenAI's defaults where the body has none: temperature 1,
        top_p 1, every token (no top-k)."""
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(self.min_tokens or 0, max_new_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=self.stops() + extra_stops,
            seed=self.seed,
        )


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt to continue."""

    prompt: str | list[str] | list[int] | list[list[int]]
    #: OpenAI's default for completions: 16 tokens.
    max_tokens: int | None = Field(16, ge=1)
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        prompt = self.prompt
        if isinstance(prompt, list) and not (len(prompt) == 1 and isinstance(prompt[0], str)):
            if prompt and all(isinstance(p, str) for p in prompt):
                raise _unsupported("prompt", "only one prompt per request (a string, or a list of one)")
            raise _unsupported("prompt", "token ids are not supported: send the text")
        if self.suffix:
            raise _unsupported("suffix", "is not supported (no insertion)")
        if self.echo:
            raise _unsupported("echo", "is not supported")
        if self.logprobs is not None:
            raise _unsupported("logprobs", "is not supported")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", "only 1 is supported")

    @property
    def text(self) -> str:
        """The prompt's text."""
        prompt = self.prompt
        return prompt if isinstance(prompt, str) else str(prompt[0])


class ChatMessage(_Body):
    """One message of ``messages``: text only."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None


class ResponseFormat(_Body):
    """``response_format``: only ``{"type": "text"}`` is done."""

    type: str
    json_schema: dict[str, Any] | None = None


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``: a conversation to answer."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise _unsupported("logprobs", "is not supported")
        if self.top_logprobs is not None:
            raise _unsupported("top_logprobs", "is not supported")
        if self.tools or self.functions:
            raise _unsupported("tools" if self.tools else "functions", "tool calls are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise _unsupported(name, "tool calls are not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise _unsupported("response_format", "only text is supported")
        if self.modalities is not None and self.modalities != ["text"]:
            raise _unsupported("modalities", "only text is supported")
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                raise _unsupported(name, "is not supported")
        for i, message in enumerate(self.messages):
            _check_message(message, f"messages[{i}]")

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens`` (deprecated by OpenAI), else ``None``."""
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as a chat template takes them: ``{"role", "content"}`` (and ``name``), the
        content's text parts joined by newlines, ``developer`` as ``system``."""
        out: list[dict[str, Any]] = []
        for message in self.messages:
            entry: dict[str, Any] = {
                "role": "system" if message.role == "developer" else message.role,
                "content": _text(message.content),
            }
            if message.name is not None:
                entry["name"] = message.name
            out.append(entry)
        return out


_ROLES = ("system", "developer", "user", "assistant")


def _check_message(message: ChatMessage, where: str) -> None:
    if message.role not in _ROLES:
        if message.role in ("tool", "function"):
            raise _unsupported(f"{where}.role", "tool messages are not supported (no tool calls)")
        raise OpenAIError(
            400,
            f"{where}.role: must be one of {', '.join(_ROLES)}",
            param=f"{where}.role",
            code="invalid_value",
        )
    if message.tool_calls or message.function_call is not None or message.tool_call_id is not None:
        raise _unsupported(f"{where}.tool_calls", "tool calls are not supported")
    if message.audio is not None:
        raise _unsupported(f"{where}.audio", "is not supported")
    content = message.content
    if content is None and message.role != "assistant":
        raise OpenAIError(400, f"{where}.content: required", param=f"{where}.content", code="invalid_value")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _unsupported(f"{where}.content[{j}]", "only text parts are supported")


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part["text"]) for part in content)


def parse_request(kind: Kind, payload: dict[str, Any]) -> CompletionRequest | ChatRequest:
    """Validate ``payload`` as a completion or chat request.

    Raises :class:`OpenAIError` (400): for a field OpenAI does not have (``Unrecognized request
    argument supplied``), for every type or range problem (all named in the message, the first
    in ``param``), and for a field set to what this server does not do.
    """
    model = CompletionRequest if kind == "completion" else ChatRequest
    unknown = sorted(set(payload) - set(model.model_fields))
    if unknown:
        shown = ", ".join(name if len(name) <= 64 else f"{name[:32]}…" for name in unknown[:5])
        raise OpenAIError(
            400,
            f"Unrecognized request argument supplied: {shown}",
            param=unknown[0][:64],
            code="unknown_parameter",
        )
    try:
        request = model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = [(_loc(err["loc"], {}), problem_message(err)) for err in errors[:10]]
        missing = errors[0]["type"] == "missing"
        raise OpenAIError(
            400,
            "; ".join(f"{loc}: {msg}" for loc, msg in problems),
            param=problems[0][0],
            code="missing_required_parameter" if missing else "invalid_value",
        ) from None
    request.refuse_unsupported()
    return request


# -- the chat prompt without a template --------------------------------------------------------


def fallback_chat_prompt(messages: list[dict[str, Any]]) -> str:
    """The plain prompt for a model whose tokenizer has no chat template (Falcon-7B's has none).

    One line per message, ``System: ``, ``User: `` or ``Assistant: `` and its text, then
    ``Assistant:`` for the model to go on; the reply stops before :data:`CHAT_STOP` (the next
    ``User:`` line). ``name`` is not shown.
    """
    labels = {"system": "System", "user": "User", "assistant": "Assistant"}
    lines = [f"{labels[message['role']]}: {message['content']}" for message in messages]
    return "\n".join([*lines, "Assistant:"])


# -- responses ---------------------------------------------------------------------------------

#: The service's finish reasons that OpenAI's name: end of sequence and stop strings are ``stop``.
_FINISH = {"length": "length", "eos": "stop", "stop": "stop"}


def new_id(kind: Kind) -> str:
    """A response id: ``cmpl-...`` or ``chatcmpl-...``, 96 random bits."""
    return f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{secrets.token_hex(12)}"


def _finish_reason(summary: dict[str, Any]) -> str:
    reason = _FINISH.get(summary.get("finish_reason", ""))
    if reason is None:  # cancelled while its client still reads: not a reply to hand out
        raise RuntimeError(f"the generation ended as {summary.get('finish_reason')!r}")
    return reason


def _usage(summary: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = summary.get("prompt_tokens"), int(summary["generated_tokens"])
    total = None if prompt is None else prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


class ChunkStream:
    """A service's items (``{"text"}`` pieces, then its summary) as OpenAI stream chunks (dicts).

    A class, not a generator, so that :meth:`close` closes the service's stream even when the
    client left before the first chunk (a generator never started ignores ``close()``, and the
    request's place in the batch would leak).
    """

    def __init__(
        self,
        items: Iterator[dict[str, Any]],
        *,
        kind: Kind,
        model: str,
        include_usage: bool = False,
        response_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self._items = items
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = response_id or new_id(kind)
        self.created = int(time.time()) if created is None else created
        self._chunks = self._run()

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._chunks)

    def close(self) -> None:
        """Stop: the service's stream is closed (its row leaves the batch)."""
        try:
            self._chunks.close()
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion" if self.kind == "completion" else "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [{"index": 0, **choice, "logprobs": None}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _piece(self, text: str, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        if self.kind == "completion":
            return self._chunk({"text": text, "finish_reason": finish_reason})
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
        if text and not role:
            delta["content"] = text
        return self._chunk({"delta": delta, "finish_reason": finish_reason})

    def _run(self) -> Generator[dict[str, Any], None, None]:
        if self.kind == "chat":  # at once, whatever the wait for a place in the batch
            yield self._piece("", role=True)
        summary: dict[str, Any] | None = None
        for item in self._items:
            if "text" in item:
                yield self._piece(item["text"])
            elif "finish_reason" in item:
                summary = item
        if summary is None:
            raise RuntimeError("the generation ended without its summary")
        yield self._piece("", _finish_reason(summary))
        if self.include_usage:
            usage = self._chunk(None)
            usage["usage"] = _usage(summary)
            yield usage


def collect(
    items: Iterator[dict[str, Any]], *, kind: Kind, model: str, response_id: str | None = None
) -> dict[str, Any]:
    """Read the service's stream to its end; return the whole response (``stream: false``)."""
    pieces: list[str] = []
    summary: dict[str, Any] | None = None
    for item in items:
        if "text" in item:
            pieces.append(item["text"])
        elif "finish_reason" in item:
            summary = item
    if summary is None:
        raise RuntimeError("the generation ended without its summary")
    text, reason = "".join(pieces), _finish_reason(summary)
    if kind == "completion":
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    else:
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    return {
        "id": response_id or new_id(kind),
        "object": "text_completion" if kind == "completion" else "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(summary),
    }


def stream_closer(*, expose_errors: bool, request_id: str) -> Callable[[BaseException | None, bool], bytes]:
    """What ends an OpenAI stream (the streaming runtime's ``closer``): ``data: [DONE]``, after
    one ``data: {"error": ...}`` event when the generation failed or the worker shuts down.

    An error's message is generic (with the request id) unless ``expose_errors``; a refusal
    raised mid-stream (an upstream engine's) keeps its message, as the extension's error events do.
    """

    def close(error: BaseException | None, shutdown: bool) -> bytes:
        if shutdown:
            failure = OpenAIError(503, "the server is shutting down; send the request again", code="shutdown")
        elif error is None:
            return DONE
        elif isinstance(error, RequestError):
            failure = as_openai_error(error)
        elif expose_errors:
            failure = OpenAIError(500, f"{type(error).__name__}: {error}")
        else:
            failure = OpenAIError(500, f"the generation failed (request id {request_id})")
        return encode(failure.body()) + DONE

    return close


def models_list(model: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one model served."""
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "flask-sse-run"}],
    }
