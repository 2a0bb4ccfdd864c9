"""The Falcon-7B blueprint: ``/falcon/run`` streams generated text, ``GET /falcon/health``, and
OpenAI's ``/falcon/v1/completions``, ``/falcon/v1/chat/completions`` and ``/falcon/v1/models``.

``falcon_blueprint`` is a plain :class:`flask.Blueprint`, importable without torch
(``from flask_sse_run.llm import falcon_blueprint``): ``app.register_blueprint(falcon_blueprint)``
on any app mounts everything (``init_falcon(app)`` does just that). Its first registration on an app creates
the app's generation service (``app.extensions["falcon"]``) from that app's config.

Enabled by the environment variable ``FALCON_MODEL``: a hub id such as
``tiiuae/falcon-7b-instruct`` or a local directory. Without it the app starts as usual (nothing
is downloaded, torch is not even imported) and the Falcon endpoints answer 503 saying how to
enable them. ``app.config`` keys of the same names win over the environment (tests use them):

* ``FALCON_MAX_BATCH`` (16): streams decoded together in one batch; ``FALCON_MAX_QUEUE`` (8)
  more wait; beyond that, 503 with ``Retry-After``.
* ``FALCON_MAX_BATCH_TOKENS`` (32768): the batch's KV cache bound, in tokens (padding
  included); a request waits until it fits, and one that never could gets 422.
* ``FALCON_PREFILL_CHUNK`` (512): prompt tokens prefilled per step.
* ``FALCON_MAX_TOKENIZING`` (2): prompts longer than 16 KiB tokenized at once, off the hub;
  ``FALCON_MAX_QUEUE`` more wait their turn; beyond that, 503 with ``Retry-After``.
* ``FALCON_BATCHING`` (1): 0 runs one ``generate()`` per stream instead,
  ``FALCON_CONCURRENCY`` (1) at a time.

``FALCON_UPSTREAM`` (an OpenAI-compatible engine's URL) streams from that engine instead, with no
model in this process (see :func:`upstream_service`).

Next to ``run``, the blueprint serves OpenAI's API (:mod:`flask_sse_run.llm.openai_views`):
``POST /falcon/v1/completions``, ``POST /falcon/v1/chat/completions``, ``GET /falcon/v1/models``.
``FALCON_OPENAI_PREFIX`` (``/v1``) moves them below the blueprint's prefix; ``FALCON_OPENAI_MODEL``
names the model they report (see :func:`model_name`).

The model loads in each gunicorn worker after the fork (``post_worker_init`` in
``gunicorn.conf.py`` starts it; otherwise the first request does), on the worker's dedicated
torch thread, while the worker serves everything else. A bad value fails at start-up.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from flask.blueprints import BlueprintSetupState
from flask.sansio.app import App
from pydantic import Field

from ..extension import SSERun
from ..registry import EXTENSION_KEY as SSE_RUN_KEY
from .openai_views import TextService, add_openai_routes
from .params import GenerationParams
from .service import INSTALL_HINT, GenerationService
from .upstream import UpstreamService

if TYPE_CHECKING:
    from ..metrics import LLMMetrics

__all__ = [
    "EXTENSION_KEY",
    "MODEL_NAME_KEY",
    "falcon",
    "falcon_blueprint",
    "init_falcon",
    "model_name",
    "openai_prefix",
    "start_in_worker",
]

EXTENSION_KEY = "falcon"
#: Where the app keeps the model name its OpenAI routes report and accept.
MODEL_NAME_KEY = "falcon.model_name"
ENABLE_HINT = (
    "set FALCON_MODEL to a Hugging Face model id (e.g. tiiuae/falcon-7b-instruct) or a local "
    f"directory, {INSTALL_HINT}, and restart the server"
)

falcon_blueprint = Blueprint("falcon", __name__, url_prefix="/falcon")
falcon = SSERun(falcon_blueprint)

StopString = Annotated[str, Field(min_length=1, max_length=64)]


@falcon.function(resumable=True, methods=("GET", "POST"))
def run(
    prompt: Annotated[str, Field(min_length=1)],
    max_new_tokens: Annotated[int, Field(ge=1, le=2048)] = 256,
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7,
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9,
    top_k: Annotated[int, Field(ge=0)] = 50,
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0,
    stop: Annotated[tuple[StopString, ...], Field(max_length=4)] = (),
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None,
    min_new_tokens: Annotated[int, Field(ge=0, le=2048)] = 0,
) -> Iterator[dict[str, Any]]:
    """Stream the model's continuation of ``prompt``, one event per piece of text.

    Events: ``{"text": "...", "index": i}`` for each piece, then ``{"finish_reason":
    "length"|"stop"|"eos"|"cancelled", "generated_tokens": n, "prompt_tokens": n,
    "time_to_first_token_ms": ..., "tokens_per_s": ...}``. ``temperature`` 0 decodes greedily.
    The output ends before the first of the ``stop`` strings. ``min_new_tokens`` forbids EOS
    before that many tokens.

    A resumable run, served with GET too (``EventSource``): the generation goes on when the
    client's connection drops, and a reconnect with ``Last-Event-ID`` gets the rest of the text;
    ``DELETE /falcon/runs/<run_id>``, or no client for ``SSE_RUN_RESUME_WINDOW`` seconds, stops it
    (its row leaves the batch at the next step).
    """
    service: GenerationService | UpstreamService = current_app.extensions[EXTENSION_KEY]
    params = GenerationParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(min_new_tokens, max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        stop=stop,
        seed=seed,
    )
    return service.stream(prompt, params)


def _setting(app: App, name: str, default: str | None) -> str | None:
    value = app.config.get(name, os.environ.get(name, default))
    return None if value is None else str(value)


def _number(app: App, name: str, default: int) -> int:
    text = _setting(app, name, None)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {text!r}") from None


def _show_progress(logger: logging.Logger) -> None:
    # The loading progress must reach the server log, which a bare library logger does not.
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def upstream_service(app: App) -> UpstreamService | None:
    """The engine-backed service when ``FALCON_UPSTREAM`` is set (it wins over ``FALCON_MODEL``).

    ``FALCON_UPSTREAM`` is an OpenAI-compatible base URL (``http://host:port/v1``: vLLM, TGI,
    ``transformers serve``); ``FALCON_UPSTREAM_MODEL`` the model name to ask for (default: the
    engine's only one), ``FALCON_UPSTREAM_API_KEY`` its bearer token, ``FALCON_UPSTREAM_EXTENSIONS``
    the non-OpenAI parameters it takes (``top_k,repetition_penalty,min_new_tokens`` for vLLM).
    """
    url = _setting(app, "FALCON_UPSTREAM", None)
    if not url:
        return None
    extensions = _setting(app, "FALCON_UPSTREAM_EXTENSIONS", "") or ""
    return UpstreamService(
        url,
        model=_setting(app, "FALCON_UPSTREAM_MODEL", None),
        api_key=_setting(app, "FALCON_UPSTREAM_API_KEY", None),
        extensions=[name.strip() for name in extensions.split(",") if name.strip()],
        metrics=_llm_metrics(app),
    )


def _llm_metrics(app: App) -> LLMMetrics | None:
    """The LLM metrics, when the app records metrics (``SSE_RUN_METRICS``)."""
    state = app.extensions.get(SSE_RUN_KEY)  # the blueprint's SSERun has mounted: it read them
    if state is None or not state.settings.metrics:
        return None
    from ..metrics import llm_metrics

    return llm_metrics()


def make_service(app: App) -> GenerationService | UpstreamService:
    """The generation service ``app``'s config asks for (not started: a worker starts it).

    Reads the ``FALCON_*`` keys (the module's docstring lists them); raises :class:`ValueError`
    for a value that is not an integer or is out of range.
    """
    service = upstream_service(app) or GenerationService(
        _setting(app, "FALCON_MODEL", None),
        batching=_number(app, "FALCON_BATCHING", 1) != 0,
        max_batch=_number(app, "FALCON_MAX_BATCH", 16),
        max_batch_tokens=_number(app, "FALCON_MAX_BATCH_TOKENS", 32768),
        prefill_chunk=_number(app, "FALCON_PREFILL_CHUNK", 512),
        concurrency=_number(app, "FALCON_CONCURRENCY", 1),
        max_queue=_number(app, "FALCON_MAX_QUEUE", 8),
        max_tokenizing=_number(app, "FALCON_MAX_TOKENIZING", 2),
        disabled_hint=ENABLE_HINT,
        metrics=_llm_metrics(app),
    )
    _show_progress(service.logger)
    return service


def model_name(app: App) -> str:
    """The model name the OpenAI routes report (``GET /v1/models``) and accept in ``model``.

    ``FALCON_OPENAI_MODEL`` if set; else ``FALCON_UPSTREAM_MODEL`` in front of an engine, or
    ``FALCON_MODEL`` (the hub id or directory, as vLLM names a model after its path); else
    ``"falcon"``.
    """
    upstream = _setting(app, "FALCON_UPSTREAM", None)
    source = _setting(app, "FALCON_UPSTREAM_MODEL" if upstream else "FALCON_MODEL", None)
    return _setting(app, "FALCON_OPENAI_MODEL", None) or source or "falcon"


def openai_prefix(app: App) -> str:
    """Where the OpenAI routes go below the blueprint's prefix: ``FALCON_OPENAI_PREFIX``
    (default ``/v1``; ``""``: right below it). Raises :class:`ValueError` for a bad one."""
    prefix = _setting(app, "FALCON_OPENAI_PREFIX", "/v1") or ""
    if prefix and (not prefix.startswith("/") or prefix.endswith("/") or "<" in prefix):
        raise ValueError(f"FALCON_OPENAI_PREFIX must be empty or a path like /v1, not {prefix!r}")
    return prefix


@falcon_blueprint.record_once
def _create_service(setup: BlueprintSetupState) -> None:
    # Once per app, at its first registration of the blueprint: the service is the app's, read
    # from its config, whatever prefix (or how many prefixes) the blueprint is mounted under.
    setup.app.extensions[EXTENSION_KEY] = make_service(setup.app)
    setup.app.extensions[MODEL_NAME_KEY] = model_name(setup.app)


def _service() -> TextService:
    service: GenerationService | UpstreamService = current_app.extensions[EXTENSION_KEY]
    return service


def _model_name() -> str:
    return str(current_app.extensions[MODEL_NAME_KEY])


@falcon_blueprint.record
def _openai_routes(setup: BlueprintSetupState) -> None:
    # At each registration, below its prefix: POST {prefix}/v1/completions and
    # /v1/chat/completions, GET /v1/models (flask_sse_run.llm.openai_views).
    add_openai_routes(setup, _service, _model_name, prefix=openai_prefix(setup.app))


@falcon_blueprint.get("/health")
def health() -> Response:
    """The service's state: 200 when the model is ready, 503 otherwise (see the README)."""
    service: GenerationService | UpstreamService = current_app.extensions[EXTENSION_KEY]
    body = service.health()
    response = jsonify(body)
    response.status_code = 200 if body["status"] == "ready" else 503
    return response


def init_falcon(app: Flask) -> GenerationService | UpstreamService:
    """Register :data:`falcon_blueprint` on ``app``; return the app's generation service.

    The model starts loading in a worker, not here. Raises :class:`ValueError` for a
    ``FALCON_*`` value that is not an integer or is out of range.
    """
    app.register_blueprint(falcon_blueprint)
    service: GenerationService | UpstreamService = app.extensions[EXTENSION_KEY]
    return service


def start_in_worker(app: Any) -> None:
    """Start loading the model of ``app`` (if it has the Falcon endpoints): for gunicorn's hook."""
    extensions = getattr(app, "extensions", None)
    service = extensions.get(EXTENSION_KEY) if isinstance(extensions, dict) else None
    if isinstance(service, GenerationService):
        service.start()
