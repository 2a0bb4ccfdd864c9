"""Where an instance is served: its URL rules on an app, added directly or by a blueprint.

An :class:`~flask_sse_run.SSERun` is *mounted* once per place it serves: on an app it was given
(``SSERun(app)``), and at each registration of a blueprint it was given (``SSERun(bp)``; a
blueprint registered under two prefixes, or on two apps, mounts it twice). Each mount adds the
same rules below its prefix: ``/<name>``, ``/openapi.json``, ``/runs/<run_id>``, ``/channels``,
``/channels/<channel>`` and, when the prefix is not empty, ``/<path:rest>`` (a JSON 404 for any
other path below it).

Through a blueprint the rules are the blueprint's, as :meth:`flask.Blueprint.add_url_rule` would
make them: its ``url_prefix`` and ``subdomain``, its ``url_defaults``, and endpoints qualified by
its (dotted) name, so that Flask runs its ``url_value_preprocessor``, ``before_request``,
``after_request`` and error handlers for them. They differ in one way: each rule matches every
method, which Flask's ``add_url_rule`` cannot express (the views answer every method in JSON).

URL values of the prefix (``/<tenant>``) and ``url_defaults`` are left in
``flask.request.view_args`` for the blueprint's hooks; the views ignore them, and a function
takes its arguments from the body or query only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, request

from .channels.views import channels_view
from .openapi import OPENAPI_PATH, openapi_view
from .registry import APP_ENDPOINTS, Mount
from .runs.responses import run_view
from .views import call_function, unknown_path

__all__ = ["APP_ENDPOINTS", "Mount", "add_rules", "blueprint_endpoints"]


def blueprint_endpoints(blueprint: str) -> str:
    """The endpoint names' start for an instance mounted by blueprint ``blueprint`` (its dotted
    name): ``api.sse_run_call``. No dot after the blueprint's name: ``request.blueprint`` is
    the blueprint's own name, as for its other views."""
    return f"{blueprint}.sse_run_"


def add_rules(app: Flask, mount: Mount, defaults: Mapping[str, Any] | None = None) -> None:
    """Add ``mount``'s rules to ``app``, with ``defaults`` (a blueprint's ``url_defaults``).

    Raises :class:`RuntimeError` if one of its endpoints is taken already.
    """
    prefix = mount.url_prefix
    functions = mount.extension.functions
    # The prefix a run is started and followed under: with <variables> in it, the values of
    # this request (/acme/api), so a run of one tenant is not reachable under another's URL.
    fixed = "<" not in prefix

    def call(name: str, **_url_values: Any) -> Response:
        return call_function(name, functions, prefix if fixed else request.path.rsplit("/", 1)[0])

    def runs(run_id: str, **_url_values: Any) -> Response:
        return run_view(run_id, functions, prefix if fixed else request.path.rsplit("/", 2)[0])

    def channel(channel: str, **_url_values: Any) -> Response:
        served = prefix if fixed else request.path.rsplit("/", 2)[0]
        return channels_view(channel, served)

    def channels(**_url_values: Any) -> Response:
        served = prefix if fixed else request.path.rsplit("/", 1)[0]
        return channels_view(None, served)

    def openapi(**_url_values: Any) -> Response:
        return openapi_view()

    def unknown(rest: str, **_url_values: Any) -> Response:
        return unknown_path(rest)

    # The static openapi.json rule first: Werkzeug matches it before "<name>". One "<name>" rule
    # for every name: functions registered later (even after the first request) are served
    # without touching the URL map again.
    rules: list[tuple[str, str, Callable[..., Response]]] = [
        (f"{prefix}{OPENAPI_PATH}", "openapi", openapi),
        (f"{prefix}/<name>", "call", call),
        (f"{prefix}/runs/<run_id>", "runs", runs),
        (f"{prefix}/channels", "channels", channels),
        (f"{prefix}/channels/<channel>", "channel", channel),
    ]
    if prefix:
        # The prefix is the extension's: nested paths and trailing slashes under it get our JSON
        # 404 too. Without a prefix this would take over the app's own 404s.
        rules.append((f"{prefix}/<path:rest>", "unknown", unknown))
    if any(mount.endpoint(kind) in app.view_functions for _, kind, _ in rules):
        raise RuntimeError(
            f"flask-sse-run is already registered on this app at {prefix or '/'!r}; call init_app "
            "once per app, and give each instance its own url_prefix"
        )
    for path, kind, view in rules:
        # methods=None matches every method, which Flask's add_url_rule cannot express: with a
        # list, an unlisted method (TRACE, PROPFIND) got Flask's HTML 405 and OPTIONS its
        # automatic 200, both with an Allow naming the list.
        rule = app.url_rule_class(
            path,
            endpoint=mount.endpoint(kind),
            methods=None,
            subdomain=mount.subdomain,
            defaults=dict(defaults) if defaults else None,
        )
        app.url_map.add(rule)
        app.view_functions[mount.endpoint(kind)] = view
