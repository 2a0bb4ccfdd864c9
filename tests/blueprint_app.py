"""An app that serves flask-sse-run through a blueprint, behind the blueprint's tenant lookup,
with flask-cors: the blueprint and CORS tests' (``tests.blueprint_app:create_app()`` under
gunicorn, ``TEST_APP_CONFIG`` adding config).

* ``/t/<tenant>/ticks`` (``GET`` and ``POST``, resumable): ``n`` events, ``delay`` seconds apart.
  The tenant is looked up before each request but CORS preflights: ``acme`` is served,
  ``closed`` is refused with ``Forbidden`` (403), any other with ``LookupError`` (404); the
  blueprint's error handlers answer both in JSON. CORS headers on everything below ``/t/``.
* ``/private/<tenant>/ticks``: the same blueprint registered a second time, outside CORS.
* ``GET /blank``: an empty page, for a browser to run a script on another origin than the API's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, abort, g, request
from flask_cors import CORS
from werkzeug.exceptions import Forbidden

from flask_sse_run import SSERun

#: What a cross-origin client needs to read (Access-Control-Expose-Headers) ...
EXPOSE_HEADERS = ["X-Request-ID", "X-Run-ID"]
#: ... and to send (Access-Control-Allow-Headers, answered to the preflight).
ALLOW_HEADERS = ["Content-Type", "Authorization", "Last-Event-ID", "Prefer", "X-Request-ID"]

tenants = Blueprint("tenants", __name__, url_prefix="/t/<tenant>")
sse = SSERun(tenants)


@tenants.url_value_preprocessor
def pull_tenant(endpoint: str | None, values: dict[str, Any] | None) -> None:
    g.tenant = values.pop("tenant", None) if values else None


@tenants.before_request
def look_up_tenant() -> None:
    if request.method == "OPTIONS":
        # A CORS preflight carries no credentials, and the browser sends the request only after
        # a 2xx answer: refusing it would hide the real answer (this 403) from the page.
        return
    if g.tenant == "closed":
        abort(403)
    if g.tenant != "acme":
        raise LookupError(g.tenant)


@tenants.errorhandler(Forbidden)
def tenant_closed(exc: Forbidden) -> tuple[dict[str, str], int]:
    return {"error": "this tenant is closed"}, 403


@tenants.errorhandler(LookupError)
def no_such_tenant(exc: LookupError) -> tuple[dict[str, str], int]:
    return {"error": "no such tenant"}, 404


@sse.function(resumable=True, methods=("GET", "POST"))
def ticks(n: int, delay: float = 0.0) -> Iterator[str]:
    """``n`` events, ``delay`` seconds apart, each naming the tenant."""
    for i in range(n):
        if i and delay:
            time.sleep(delay)
        yield f"{g.tenant} {i}"


def create_app(**config: Any) -> Flask:
    """The app; ``TEST_APP_CONFIG`` (JSON), then ``config``, add to its config."""
    app = Flask(__name__)
    app.config.update(json.loads(os.environ.get("TEST_APP_CONFIG", "{}")))
    app.config.update(config)

    @app.get("/blank")
    def blank() -> str:
        return "<!doctype html><title>another origin</title>"

    app.register_blueprint(tenants)
    app.register_blueprint(tenants, name="private", url_prefix="/private/<tenant>")
    CORS(app, resources=r"/t/*", expose_headers=EXPOSE_HEADERS, allow_headers=ALLOW_HEADERS)
    return app
