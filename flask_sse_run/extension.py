"""The Flask extension: register functions, serve each at ``{url_prefix}/{name}``.

An instance serves an app directly (``SSERun(app)``) or through a blueprint (``SSERun(bp)``),
as Flask-RESTX's ``Api(bp)`` does: ``init_app(bp)`` records a callback with
:meth:`flask.Blueprint.record`, and each registration of the blueprint on an app mounts the
instance there (:mod:`flask_sse_run.routing`). The state is per app either way, in
``app.extensions["sse_run"]``, created by the first mount and found by the views through
``current_app``: an instance keeps no app.
"""

from __future__ import annotations

import inspect
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar, overload

from flask import Blueprint, Flask
from flask.blueprints import BlueprintSetupState

from .auth import Authenticator
from .binding import check_query_parameters, inspect_function, validate_name
from .channels.views import ChannelAuthorizer
from .concurrency import gunicorn_sync_worker
from .config import Settings
from .errors import ConfigurationError, RegistrationError
from .observers import observers_for
from .registry import EXTENSION_KEY, Mount, RegisteredFunction, State
from .routing import add_rules, blueprint_endpoints
from .runs.memory import MemoryRunStore
from .runs.runtime import Runs
from .runs.store import RunStore

__all__ = ["SYNC_WORKER_WARNING", "RegisteredFunction", "SSERun", "State"]

#: Logged once per app at start-up under gunicorn's sync worker.
SYNC_WORKER_WARNING = (
    "flask-sse-run: gunicorn's sync worker cannot stream for long: it cuts every stream at its "
    "timeout (WORKER TIMEOUT) and serves no other request while one runs. Run the gevent "
    "worker instead: gunicorn -k gevent (or -c gunicorn.conf.py from this project)"
)

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=Callable[[str, "str | None"], bool])


class SSERun:
    """Serve plain Python generators as Server-Sent Events endpoints.

    ``SSERun(app)`` or, with an app factory, ``sse = SSERun()`` then ``sse.init_app(app)``.
    Functions registered with :meth:`function` (before or after ``init_app``) are served at
    ``POST {url_prefix}/{name}``; ``GET {url_prefix}/openapi.json`` describes them all. Every
    other method on those URLs gets a JSON ``405`` (``OPTIONS``: ``204``), and with a non-empty
    ``url_prefix`` every other path under it a JSON ``404``; with none, the app's own 404 stands.

    ``SSERun(blueprint)`` (or ``init_app(blueprint)``) serves them wherever the blueprint is
    registered instead: below its prefix (then ``url_prefix``), on its subdomain, with its
    ``url_defaults``, as endpoints named after it (``api.sse_run_call``), and behind its
    ``before_request`` hooks and error handlers, which run before the body is read. A blueprint
    registered twice (two prefixes, or two apps) serves both.

    Config keys read from the app by ``init_app(app)``, or by the blueprint's registration on it
    (defaults in brackets):

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
    - ``SSE_RUN_METRICS`` [False]: record Prometheus metrics (the ``metrics`` extra).
    - ``SSE_RUN_METRICS_PATH`` ["/metrics"]: where ``GET`` serves them; None: nowhere.
    - ``SSE_RUN_STREAM_LOG`` [True]: one log line per stream at its end.

    Auth is on when ``SSE_RUN_AUTH_TOKENS`` or ``SSE_RUN_JWT_KEY`` is set: every function but
    those registered with ``public=True`` then needs ``Authorization: Bearer <token>`` (401).
    """

    def __init__(self, app: Flask | Blueprint | None = None, *, url_prefix: str = "") -> None:
        url_prefix = url_prefix.rstrip("/")
        if url_prefix and not url_prefix.startswith("/"):
            raise ValueError("url_prefix must start with '/'")
        self.url_prefix = url_prefix
        self.functions: dict[str, RegisteredFunction] = {}
        #: Who may read a channel (:meth:`channel_auth`); ``None``: see :mod:`.channels.views`.
        self.channel_authorizer: ChannelAuthorizer | None = None
        # Qualifies the parameter models' names (components in openapi.json), so that two
        # instances' functions of one name stay apart: the url_prefix, and the blueprint's name
        # once the instance is given one.
        self._qualifier = _qualifier(url_prefix)
        self._blueprint_named = False
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask | Blueprint) -> None:
        """Serve the functions on ``app``, or wherever the blueprint ``app`` is registered.

        Several instances may serve one app under different prefixes (the example app serves
        its Falcon functions under ``/falcon``); the first one mounted reads the settings from
        the app and the others share them. Given a blueprint, nothing happens until
        ``app.register_blueprint(blueprint)``: each registration mounts the instance on that
        app below the blueprint's prefix, reading the settings there if it is the app's first.
        Raises :class:`RuntimeError` if this instance is already given to this blueprint, or
        when mounted where an instance is already served on the app (the same prefix and
        subdomain), and :class:`~flask_sse_run.ConfigurationError` if an ``SSE_RUN_*`` key is
        invalid. Flask raises :class:`AssertionError` for a blueprint that was registered
        already.
        """
        if isinstance(app, Blueprint):
            self._give_blueprint(app)
        else:
            self._mount(app, Mount(self, self.url_prefix))

    def _give_blueprint(self, blueprint: Blueprint) -> None:
        if self._on_blueprint_registered in blueprint.deferred_functions:
            raise RuntimeError("flask-sse-run is already on this blueprint; call init_app once per blueprint")
        blueprint.record(self._on_blueprint_registered)
        if not self._blueprint_named:
            self._blueprint_named = True
            self._qualifier = _qualifier(f"/{blueprint.name}{self.url_prefix}")
            # Functions registered before: their models are named again, so that an instance's
            # names do not depend on the order of set-up.
            for name, registered in self.functions.items():
                binder = inspect_function(registered.func, name, model_name=self._model_name(name))
                self.functions[name] = replace(registered, binder=binder)

    def _on_blueprint_registered(self, setup: BlueprintSetupState) -> None:
        # What Blueprint.add_url_rule would do with each rule (BlueprintSetupState.add_url_rule):
        # its prefix, subdomain, url_defaults and dotted name (nested blueprints included).
        blueprint = f"{setup.name_prefix}.{setup.name}".lstrip(".")
        prefix = (setup.url_prefix or "").rstrip("/") + self.url_prefix
        mount = Mount(self, prefix, blueprint_endpoints(blueprint), setup.subdomain)
        self._mount(setup.app, mount, setup.url_defaults)  # type: ignore[arg-type]  # a Flask app

    def _mount(self, app: Flask, mount: Mount, defaults: Mapping[str, Any] | None = None) -> None:
        state: State | None = app.extensions.get(EXTENSION_KEY)
        if state is not None and any(
            (m.url_prefix, m.subdomain) == (mount.url_prefix, mount.subdomain) for m in state.mounts
        ):
            raise RuntimeError(
                f"flask-sse-run is already registered on this app at {mount.url_prefix or '/'!r}; call "
                "init_app once per app, and give each instance (or blueprint registration) its own prefix"
            )
        if state is None:
            for key, value in Settings.defaults().items():
                app.config.setdefault(key, value)
            settings = Settings.from_config(app.config)
            state = State(
                extension=self,
                settings=settings,
                auth=Authenticator.from_settings(settings),
                runs=_runs(settings),
                observers=observers_for(settings),
            )
            app.extensions[EXTENSION_KEY] = state
            if settings.metrics:
                from .metrics import channel_metrics, serve_metrics

                serve_metrics(app, settings.metrics_path)
                state.runs.channels.metrics = channel_metrics()
            if "sse" not in app.cli.commands:
                from .channels.cli import sse_cli

                app.cli.add_command(sse_cli)
            if gunicorn_sync_worker():
                app.logger.warning(SYNC_WORKER_WARNING)
        add_rules(app, mount, defaults)
        state.mounts.append(mount)

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
            binder = inspect_function(f, fname, model_name=self._model_name(fname))
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

    def channel_auth(self, func: A, /) -> A:
        """Register the callback that decides who may read a channel: ``@sse.channel_auth``.

        It is called as ``func(channel, subject)`` for each channel a request asks to follow, in
        the request's context, with the JWT's ``sub`` (``None`` for a static token, or when
        auth is off), and returns whether the caller may read it; a ``False`` answers 403 before
        the stream starts. Channels are the app's: the callback guards them at the channel URLs
        of every instance on the app (with callbacks on several, each must allow). Without a
        callback, channels are open when auth is off, and open to any authenticated caller
        when it is on.
        """
        self.channel_authorizer = func
        return func

    def publish(self, channel: str, data: Any, event: str | None = None, *, app: Flask | None = None) -> str:
        """Publish ``data`` on ``channel`` to every client following it; return the event's id.

        From any code with the app: in a request, a generator, a CLI command or a job in
        another process (an RQ or Celery worker) that made the app, inside
        ``app.app_context()`` or given ``app``. With ``SSE_RUN_REDIS_URL`` the event reaches
        every worker and replica; with the in-process store, this process's clients only.
        Raises :class:`ValueError` / :class:`TypeError` for a bad name or data, and a 503
        :class:`~flask_sse_run.RequestError` (``StoreUnavailable``) when Redis is away.
        """
        from flask import current_app

        from .channels.publishing import publish

        target = app if app is not None else current_app
        state: State | None = target.extensions.get(EXTENSION_KEY)
        if state is None:
            raise RuntimeError("flask-sse-run is not set up on this app (call init_app first)")
        return publish(state, channel, data, event)

    def _model_name(self, name: str) -> str | None:
        # The qualifier keeps schemas apart in openapi.json when two instances serve functions
        # of the same name (/run and /falcon/run).
        return f"{self._qualifier}_{name}_parameters" if self._qualifier else None


def _qualifier(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", path.strip("/").replace("/", "_"))


def _check_cluster_url(url: str) -> None:
    """A Redis Cluster is reached by redis:// or rediss://, and has only database 0 (redis-py
    refuses anything else at the first call, which would make every run a 503)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(
            "SSE_RUN_REDIS_CLUSTER: a cluster is reached by redis:// or rediss://, not unix://"
        )
    databases = [parts.path.strip("/"), *urllib.parse.parse_qs(parts.query).get("db", [])]
    if any(database not in ("", "0") for database in databases):
        raise ConfigurationError(
            "SSE_RUN_REDIS_URL: a Redis Cluster has only database 0 (end the URL with /0)"
        )


def _runs(settings: Settings) -> Runs:
    store: RunStore
    if settings.redis_cluster and settings.redis_url is None:
        raise ConfigurationError("SSE_RUN_REDIS_CLUSTER needs SSE_RUN_REDIS_URL (any node of the cluster)")
    if settings.redis_url is None:
        store = MemoryRunStore(
            max_events=settings.resume_max_events,
            max_bytes=settings.resume_max_bytes,
            max_runs=settings.max_runs,
            ttl=settings.resume_ttl,
            budget=settings.max_bytes,
            channel_history=settings.channel_history,
            channel_ttl=settings.channel_history_ttl,
        )
    else:
        from .runs.redis_store import RedisRunStore

        if settings.redis_cluster:
            _check_cluster_url(settings.redis_url)
        try:
            store = RedisRunStore(
                settings.redis_url,
                prefix=settings.redis_prefix,
                max_events=settings.resume_max_events,
                max_bytes=settings.resume_max_bytes,
                max_runs=settings.max_runs,
                ttl=settings.resume_ttl,
                window=settings.resume_window,
                cluster=settings.redis_cluster,
                channel_history=settings.channel_history,
                channel_ttl=settings.channel_history_ttl,
            )
        except ImportError as exc:  # the redis extra is not installed
            raise ConfigurationError(str(exc)) from None
        except ValueError:  # the URL is not echoed: it may hold a password
            raise ConfigurationError(
                "SSE_RUN_REDIS_URL: not a redis://, rediss:// or unix:// URL, or a query value is wrong"
            ) from None
    return Runs(store, window=settings.resume_window, outage=settings.store_outage)
