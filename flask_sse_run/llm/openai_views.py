"""OpenAI-compatible routes for an LLM service: ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``.

:func:`add_openai_routes` adds them to an app, a blueprint, or a blueprint's registration (the
Falcon blueprint adds them in a ``record`` callback, below a prefix read from the app's config).
They serve any service with the interface of :class:`~flask_sse_run.llm.GenerationService` and
:class:`~flask_sse_run.llm.UpstreamService` (:class:`TextService`), through the extension's own
machinery: the app's :class:`~flask_sse_run.SSERun` settings and bearer auth (checked before the
body is read), the body's limits, the service's admission (503 with ``Retry-After``, 422 for a
prompt too long, both in OpenAI's shape), and the streaming runtime (keep-alive comments,
disconnects that take the row out of the batch, gzip, the shutdown). The protocol itself is
:mod:`.openai_api`.

The body's ``stream`` flag decides between a stream and one JSON document, never ``Accept``:
the official SDK sends ``Accept: application/json`` when it streams too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

from flask import Request, Response, current_app, request
from werkzeug.exceptions import HTTPException

from ..auth import authenticate
from ..body_timeout import with_deadline
from ..cancellation import TOKEN_VAR, CancelToken
from ..concurrency import gevent_patched
from ..disconnect import Interrupted, interrupt_on_disconnect
from ..errors import RequestError, UnreadableBody
from ..negotiation import request_id
from ..payload import read_json_object
from ..registry import EXTENSION_KEY
from ..responses import error_response, json_response, options_response, stream_response
from ..streaming import StreamOptions, close_stream_source
from ..views import _in_thread_pool
from .openai_api import (
    CHAT_STOP,
    ChatRequest,
    ChunkStream,
    CompletionRequest,
    Kind,
    OpenAIError,
    as_openai_error,
    collect,
    fallback_chat_prompt,
    models_list,
    new_id,
    parse_request,
    stream_closer,
)
from .params import GenerationParams

if TYPE_CHECKING:
    from ..registry import State

__all__ = ["CHAT_FALLBACK_MAX_TOKENS", "TextService", "add_openai_routes"]

#: ``max_tokens`` of a chat request without one, when the service cannot tell how much room the
#: prompt leaves (an upstream engine's context is not known here).
CHAT_FALLBACK_MAX_TOKENS = 256
#: Methods the rules take: any other is answered 405 in OpenAI's shape (not Flask's HTML one).
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: The service's parameter names, as a request names them.
_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class TextService(Protocol):
    """What the routes need of a service (:class:`~flask_sse_run.llm.GenerationService` and
    :class:`~flask_sse_run.llm.UpstreamService` have it)."""

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[dict[str, Any]]:
        """Admit a request (or raise :class:`RequestError`); its ``{"text"}`` items and summary."""
        ...

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str | None:
        """The chat template's prompt for ``messages``, or ``None`` (then the plain fallback)."""
        ...

    def max_new_tokens_for(self, prompt: str) -> int | None:
        """The most tokens ``prompt`` leaves room for, or ``None`` when it is not known."""
        ...


Target = Any  # a Flask app, a Blueprint, or a BlueprintSetupState: each has add_url_rule


def add_openai_routes(
    target: Target,
    service: Callable[[], TextService],
    model: Callable[[], str],
    *,
    prefix: str = "/v1",
    endpoint: str = "openai",
) -> None:
    """Add ``{prefix}/completions``, ``{prefix}/chat/completions`` and ``{prefix}/models`` to
    ``target`` (an app, a blueprint, or a :class:`~flask.blueprints.BlueprintSetupState`).

    ``service()`` and ``model()`` are called per request, in the app's context: the service to
    generate with and the model name the routes report and accept (a request naming another
    gets 404 ``model_not_found``). The app must have an :class:`~flask_sse_run.SSERun` (its
    settings and auth apply). Endpoints are ``{endpoint}_completions``,
    ``{endpoint}_chat_completions`` and ``{endpoint}_models`` (a blueprint's name before them).
    """
    created = int(time.time())

    def completions() -> Response:
        return _generate("completion", service, model)

    def chat_completions() -> Response:
        return _generate("chat", service, model)

    def models() -> Response:
        return _models(model, created)

    for path, name, view in (
        ("/completions", "completions", completions),
        ("/chat/completions", "chat_completions", chat_completions),
        ("/models", "models", models),
    ):
        target.add_url_rule(
            f"{prefix}{path}",
            f"{endpoint}_{name}",
            view,
            methods=_METHODS,
            provide_automatic_options=False,
        )


def _state() -> State:
    state: State | None = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError("the OpenAI routes need an SSERun on the app (its settings and auth)")
    return state


def _method(req: Request, allowed: str, rid: str) -> Response | None:
    """The answer to ``OPTIONS`` or a method the route does not take; ``None`` for the right one."""
    if req.method == "OPTIONS":
        return options_response(f"OPTIONS, {allowed}", rid)
    if req.method != allowed and not (allowed == "GET" and req.method == "HEAD"):
        raise OpenAIError(
            405,
            f"this route takes {allowed} only",
            headers={"Allow": f"OPTIONS, {allowed}"},
        )
    return None


def _models(model: Callable[[], str], created: int) -> Response:
    state = _state()
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    rid = request_id(req.environ.get("HTTP_X_REQUEST_ID"))
    try:
        answered = _method(req, "GET", rid)
        if answered is not None:
            return answered
        authenticate(state.auth, req.environ.get("HTTP_AUTHORIZATION"), rid)
    except RequestError as exc:
        return error_response(as_openai_error(exc), rid)
    return json_response(models_list(model(), created), 200, rid)


def _generate(kind: Kind, service: Callable[[], TextService], model: Callable[[], str]) -> Response:
    state = _state()
    settings = state.settings
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    rid = request_id(req.environ.get("HTTP_X_REQUEST_ID"))
    names = {**_NAMES, "prompt": "prompt" if kind == "completion" else "messages"}
    try:
        answered = _method(req, "POST", rid)
        if answered is not None:
            return answered
        # Before the body is read: strangers cannot make us wait for it.
        authenticate(state.auth, req.environ.get("HTTP_AUTHORIZATION"), rid)
        payload = read_json_object(
            with_deadline(req.stream, settings.body_timeout),
            req.environ.get("CONTENT_TYPE", ""),
            req.content_length,
            settings.max_body,
            offload=_in_thread_pool if gevent_patched() else None,
        )
        body = parse_request(kind, payload)
        served = model()
        if body.model != served:
            # The models route beside this one, as the client reached it (prefix and mount included).
            suffix = "/chat/completions" if kind == "chat" else "/completions"
            models_path = req.script_root + req.path.removesuffix(suffix) + "/models"
            raise OpenAIError(
                404,
                f"model: this server has no such model; GET {models_path} names the one it serves",
                param="model",
                code="model_not_found",
            )
        generator = service()
        if isinstance(body, ChatRequest):
            if body.max_new_tokens is not None:
                names["max_new_tokens"] = (
                    "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
                )
            prompt, stops = _chat_prompt(generator, body)
            limit = body.max_new_tokens or generator.max_new_tokens_for(prompt) or CHAT_FALLBACK_MAX_TOKENS
        else:
            assert isinstance(body, CompletionRequest)
            prompt, stops, limit = body.text, (), body.max_tokens or 16
        items = generator.stream(prompt, body.params(limit, stops))
    except UnreadableBody as exc:
        current_app.logger.warning("request %s: the body could not be read (%s)", rid, exc.reason)
        return error_response(as_openai_error(exc), rid)
    except RequestError as exc:
        return error_response(as_openai_error(exc, names), rid)
    except HTTPException as exc:  # raised by Werkzeug while reading, e.g. MAX_CONTENT_LENGTH
        return error_response(OpenAIError(exc.code or 400, exc.name.lower()), rid)

    token = CancelToken()
    response_id = new_id(kind)
    if body.stream:
        chunks = ChunkStream(
            items, kind=kind, model=served, include_usage=body.include_usage, response_id=response_id
        )
        observers = state.observers
        rule = req.url_rule.rule if req.url_rule is not None else req.path
        record = None if observers is None else observers.stream("", rule.strip("/"), rid)
        closer = stream_closer(expose_errors=settings.expose_errors, request_id=rid)
        return stream_response(chunks, req, settings, rid, token, record=record, closer=closer)
    return _whole(kind, items, served, response_id, req, rid, token)


def _chat_prompt(service: TextService, body: ChatRequest) -> tuple[str, tuple[str, ...]]:
    """The prompt for the conversation, and the stop strings its template adds."""
    conversation = body.conversation()
    prompt = service.chat_prompt(conversation)
    if prompt is not None:
        return prompt, ()
    return fallback_chat_prompt(conversation), (CHAT_STOP,)


def _whole(
    kind: Kind,
    items: Iterator[dict[str, Any]],
    model: str,
    response_id: str,
    req: Request,
    rid: str,
    token: CancelToken,
) -> Response:
    """Generate to the end and answer one JSON document (``stream: false``).

    Under gevent a client that leaves meanwhile interrupts the wait, and its row leaves the batch.
    """
    sock = req.environ.get("gunicorn.socket") if gevent_patched() else None
    watching: AbstractContextManager[None] = (
        nullcontext() if sock is None else interrupt_on_disconnect(sock, token)
    )
    interrupted = False
    bound = TOKEN_VAR.set(token)  # the service's stream takes the current token as its own
    try:
        with watching:
            document = collect(items, kind=kind, model=model, response_id=response_id)
        return json_response(document, 200, rid)
    except Interrupted:
        interrupted = True
        current_app.logger.info("request %s: the client left; its generation was stopped", rid)
        return error_response(OpenAIError(499, "the client closed the connection"), rid)
    except RequestError as exc:  # an upstream engine's failure
        return error_response(as_openai_error(exc), rid)
    except Exception:
        current_app.logger.exception("request %s: the generation failed", rid)
        return error_response(OpenAIError(500, f"the generation failed (request id {rid})"), rid)
    finally:
        TOKEN_VAR.reset(bound)
        options = StreamOptions(request_id=rid, logger=current_app.logger)
        close_stream_source(items, token, "closed", early=interrupted, options=options)
