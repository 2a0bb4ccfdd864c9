"""The Flask extension: register functions, serve each at ``{url_prefix}/{name}``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from flask import Flask

from .auth import Authenticator
from .binding import Binder, check_query_parameters, inspect_function, validate_name
from .concurrency import gunicorn_sync_worker
from .config import Settings
from .errors import ConfigurationError, RegistrationError
from .openapi import OPENAPI_PATH, openapi_view
from .runs.memory import MemoryRunStore
from .runs.responses import run_view
from .runs.runtime import Runs
from .runs.store import RunStore
from .views import EXTENSION_KEY, call_function, unknown_path

__all__ = ["SYNC_WORKER_WARNING", "RegisteredFunction", "SSERun", "State"]

#: Logged once per app at start-up under gunicorn's sync worker.
SYNC_WORKER_WARNING = (
    "flask-sse-run: gunicorn's sync worker cannot stream for long: it cuts every stream at its "
    "timeout (WORKER TIMEOUT) and serves no other request while one runs. Run the gevent "
    "worker instead: gunicorn -k gevent (or -c gunicorn.conf.py from this project)"
)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RegisteredFunction:
    """A served function and its inspected parameters."""

    func: Callable[..., Any]
    binder: Binder
    #: Served without a bearer token even when auth is on.
    public: bool = False
    #: A generator function: calling it runs none of its code, so there is nothing to watch.
    generator: bool = False
    #: The HTTP methods it is served with (``GET`` binds the query string).
    methods: tuple[str, ...] = ("POST",)
    #: Its streams are resumable runs; ``None``: as ``SSE_RUN_RESUMABLE`` says.
    resumable: bool | None = None

    @property
    def allow(self) -> str:
        """The ``Allow`` header of its URL."""
        return ", ".join(sorted({*self.methods, "OPTIONS"}))


@dataclass(frozen=True)
class State:
    """What the extension keeps per app, in ``app.extensions["sse_run"]``."""

    #: The first instance registered; it read the settings.
    extension: SSERun
    settings: Settings
    #: The app's resumable runs and their store.
    runs: Runs
    #: ``None`` when auth is off.
    auth: Authenticator | None = None
    #: Every instance serving the app, each under its own ``url_prefix``.
    instances: list[SSERun] = field(default_factory=list)


class SSERun:
    """Serve plain Python generators as Server-Sent Events endpoints.

    ``SSERun(app)`` or, with an app factory, ``sse = SSERun()`` then ``sse.init_app(app)``.
    Functions registered with :meth:`function` (before or after ``init_app``) are served at
    ``POST {url_prefix}/{name}``; ``GET {url_prefix}/openapi.json`` describes them all. Every
    other method on those URLs gets a JSON ``405`` (``OPTIONS``: ``204``), and with a non-empty
    ``url_prefix`` every other path under it a JSON ``404``; with none, the app's own 404 stands.

    Config keys read by ``init_app`` (defaults in brackets):

    - ``SSE_RUN_MAX_BODY`` [1048576]: largest request body in bytes (413 above it).
    - ``SSE_RUN_KEEPALIVE`` [15]: seconds of silence before a ``: ping`` comment; 0 = off.
    - ``SSE_RUN_END_EVENT`` [None]: name of an empty event ending every finished stream.
    - ``SSE_RUN_EXPOSE_ERRORS`` [False]: show exception type and message in ``error`` events.
    - ``SSE_RUN_GZIP`` [True]: gzip streams for clients that accept it.
    - ``SSE_RUN_SHUTDOWN_EVENT`` ["shutdown"]: event sent to open streams on graceful shutdown.
    - ``SSE_RUN_BODY_TIMEOUT`` [30]: seconds to receive the whole body (408 after); 0 = off.
    - ``SSE_RUN_SEND_TIMEOUT`` [30]: seconds a stream's data may go unacknowledged, or a write
      may block, before the stream ends as a disconnect; 0 = off.
    - ``SSE_RUN_AUTH_TOKENS`` [None]: static bearer tokens (16+ characters) that are let in.
    - ``SSE_RUN_JWT_KEY`` [None]: HMAC secret or PEM public key that verifies JWT bearer tokens.
    - ``SSE_RUN_JWT_ALGORITHMS`` [("HS256",)]: accepted JWT algorithms (never ``none``).
    - ``SSE_RUN_JWT_AUDIENCE`` [None]: required ``aud`` of JWTs.
    - ``SSE_RUN_OPENAPI_TITLE`` [None]: ``info.title`` of openapi.json (default: the app's name).
    - ``SSE_RUN_OPENAPI_VERSION`` ["1.0.0"]: ``info.version`` of openapi.json.

    Auth is on when ``SSE_RUN_AUTH_TOKENS`` or ``SSE_RUN_JWT_KEY`` is set: every function but
    those registered with ``public=True`` then needs ``Authorization: Bearer <token>`` (401).
    """

    def __init__(self, app: Flask | None = None, *, url_prefix: str = "") -> None:
        url_prefix = url_prefix.rstrip("/")
        if url_prefix and not url_prefix.startswith("/"):
            raise ValueError("url_prefix must start with '/'")
        self.url_prefix = url_prefix
        self.functions: dict[str, RegisteredFunction] = {}
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension on ``app``.

        Several instances may serve one app under different ``url_prefix`` values (the example
        app serves its Falcon functions under ``/falcon``); the first one registered reads the
        settings and the others share them. Raises :class:`RuntimeError` if this instance, or
        another with the same ``url_prefix``, is already registered on ``app``, and
        :class:`~flask_sse_run.ConfigurationError` if an ``SSE_RUN_*`` key is invalid.
        """
        endpoint = f"sse_run.call{self.url_prefix}" if self.url_prefix else "sse_run.call"
        state = app.extensions.get(EXTENSION_KEY)
        if endpoint in app.view_functions or (state is not None and self in state.instances):
            raise RuntimeError("flask-sse-run is already registered on this app; call init_app once per app")
        if state is None:
            for key, value in Settings.defaults().items():
                app.config.setdefault(key, value)
            settings = Settings.from_config(app.config)
            state = State(
                extension=self,
                settings=settings,
                auth=Authenticator.from_settings(settings),
                runs=_runs(settings),
            )
            app.extensions[EXTENSION_KEY] = state
            if gunicorn_sync_worker():
                app.logger.warning(SYNC_WORKER_WARNING)
        state.instances.append(self)
        # A static rule: Werkzeug matches it before the "<name>" rule below.
        _add_rule(app, f"{self.url_prefix}{OPENAPI_PATH}", f"sse_run.openapi{self.url_prefix}", openapi_view)
        # One rule for every name: functions registered after init_app (even after the first
        # request) are served without touching the URL map again.
        _add_rule(
            app,
            f"{self.url_prefix}/<name>",
            endpoint,
            functools.partial(call_function, functions=self.functions, prefix=self.url_prefix),
        )
        _add_rule(
            app,
            f"{self.url_prefix}/runs/<run_id>",
            f"sse_run.runs{self.url_prefix}",
            functools.partial(run_view, functions=self.functions, prefix=self.url_prefix),
        )
        if self.url_prefix:
            # The prefix is the extension's: nested paths and trailing slashes under it get our
            # JSON 404 too. Without a prefix this would take over the app's own 404s.
            _add_rule(
                app, f"{self.url_prefix}/<path:rest>", f"sse_run.unknown{self.url_prefix}", unknown_path
            )

    @overload
    def function(self, func: F, /) -> F: ...

    @overload
    def function(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        public: bool = False,
        methods: Sequence[str] = ("POST",),
        resumable: bool | None = None,
    ) -> Callable[[F], F]: ...

    def function(
        self,
        func: F | None = None,
        /,
        *,
        name: str | None = None,
        public: bool = False,
        methods: Sequence[str] = ("POST",),
        resumable: bool | None = None,
    ) -> F | Callable[[F], F]:
        """Serve ``func`` at ``{url_prefix}/{name}``: ``@sse.function`` or ``@sse.function(...)``.

        ``name`` defaults to the function's ``__name__``. ``public=True`` serves it without a
        bearer token when auth is on. ``methods``: ``("POST",)`` (the default; the JSON body
        holds the arguments), ``("GET",)`` (the query string does, for ``EventSource``) or
        both. ``resumable=True`` makes each stream a run that outlives its connection
        (``False``: never; ``None``: as ``SSE_RUN_RESUMABLE`` says). Raises
        :class:`~flask_sse_run.RegistrationError` for a private (``_``-prefixed), malformed or
        duplicate name, other methods, or a signature that cannot be bound from a JSON object.
        """
        served = tuple(sorted({method.upper() for method in methods}))
        if not served or not set(served) <= {"GET", "POST"}:
            raise RegistrationError(f"methods must be GET, POST or both, not {tuple(methods)!r}")

        def register(f: F) -> F:
            fname = validate_name(name if name is not None else f.__name__)
            if fname in self.functions:
                raise RegistrationError(f"{fname!r} is already registered")
            # The prefix in the model's name keeps schemas apart in openapi.json when two
            # instances serve functions of the same name (/run and /falcon/run).
            qualifier = self.url_prefix.strip("/").replace("/", "_").replace("-", "_")
            model_name = f"{qualifier}_{fname}_parameters" if qualifier else None
            binder = inspect_function(f, fname, model_name=model_name)
            if "GET" in served:
                check_query_parameters(binder)
            self.functions[fname] = RegisteredFunction(
                func=f,
                binder=binder,
                public=public,
                generator=inspect.isgeneratorfunction(f),
                methods=served,
                resumable=resumable,
            )
            return f

        return register(func) if func is not None else register


def _runs(settings: Settings) -> Runs:
    store: RunStore
    if settings.redis_url is None:
        store = MemoryRunStore(
            max_events=settings.resume_max_events,
            max_bytes=settings.resume_max_bytes,
            max_runs=settings.max_runs,
            ttl=settings.resume_ttl,
        )
    else:
        try:
            from .runs.redis_store import RedisRunStore
        except ImportError:  # pragma: no cover - the redis extra is not installed
            raise ConfigurationError("SSE_RUN_REDIS_URL needs redis-py: pip install redis") from None
        try:
            store = RedisRunStore(
                settings.redis_url,
                prefix=settings.redis_prefix,
                max_events=settings.resume_max_events,
                max_runs=settings.max_runs,
                ttl=settings.resume_ttl,
                window=settings.resume_window,
            )
        except ValueError:  # the URL is not echoed: it may hold a password
            raise ConfigurationError("SSE_RUN_REDIS_URL: not a redis://, rediss:// or unix:// URL") from None
    return Runs(store, window=settings.resume_window)


def _add_rule(app: Flask, path: str, endpoint: str, view: Callable[..., Any]) -> None:
    # methods=None matches every method, which Flask's add_url_rule cannot express: with a list,
    # an unlisted method (TRACE, PROPFIND) got Flask's HTML 405 and OPTIONS its automatic 200,
    # both with an Allow naming the list. The views answer every method in JSON themselves.
    app.url_map.add(app.url_rule_class(path, endpoint=endpoint, methods=None))
    app.view_functions[endpoint] = view
