"""``SSERun(blueprint)``: served wherever the blueprint is registered, with its prefix, subdomain,
``url_defaults``, hooks and error handlers; settings, auth and runs from the registering app."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Blueprint, Flask, abort, g, request, url_for
from openapi_spec_validator import OpenAPIV31SpecValidator
from werkzeug.exceptions import Forbidden

from flask_sse_run import SSERun
from flask_sse_run.testing import parse_events, stream_events
from tests.live import gunicorn


def events(client: Any, path: str, **kwargs: Any) -> list[str]:
    return [event.data for event in stream_events(client, path, **kwargs)]


def counting_blueprint(name: str = "api", url_prefix: str | None = "/api") -> tuple[Blueprint, SSERun]:
    blueprint = Blueprint(name, __name__, url_prefix=url_prefix)
    sse = SSERun(blueprint)

    @sse.function(resumable=True, methods=("GET", "POST"))
    def count(n: int) -> Iterator[str]:
        """Count to ``n``; each event names the blueprint that served it."""
        for i in range(n):
            yield f"{request.blueprint}:{i}"

    return blueprint, sse


# --- where the functions are served --------------------------------------------------------------


def test_sse_run_of_a_blueprint_serves_under_its_prefix_as_its_endpoints() -> None:
    blueprint, _ = counting_blueprint()
    app = Flask(__name__)
    app.register_blueprint(blueprint)
    client = app.test_client()
    assert events(client, "/api/count", json={"n": 2}) == ["api:0", "api:1"]
    assert client.post("/count", json={"n": 1}).status_code == 404  # the app's root is not ours
    with app.test_request_context():
        assert url_for("api.sse_run_call", name="count") == "/api/count"
        assert url_for("api.sse_run_runs", run_id="x") == "/api/runs/x"
        assert url_for("api.sse_run_openapi") == "/api/openapi.json"
    # Other paths below the prefix are the extension's, as with url_prefix.
    assert client.post("/api/a/b").get_json() == {"error": "no such function"}


def test_init_app_with_a_blueprint_in_a_factory_serves_functions_registered_before_and_after() -> None:
    sse = SSERun()

    @sse.function
    def before() -> Iterator[str]:
        yield "before"

    blueprint = Blueprint("api", __name__, url_prefix="/api")
    sse.init_app(blueprint)

    @sse.function
    def after() -> Iterator[str]:
        yield "after"

    app = Flask(__name__)
    assert "sse_run" not in app.extensions  # nothing until the blueprint is registered
    app.register_blueprint(blueprint)

    @sse.function
    def last() -> Iterator[str]:
        yield "last"

    client = app.test_client()
    for name in ("before", "after", "last"):
        assert events(client, f"/api/{name}") == [name]


def test_an_instance_may_serve_the_app_and_a_blueprint_under_its_own_url_prefix() -> None:
    blueprint = Blueprint("tenant", __name__, url_prefix="/tenant")
    sse = SSERun(url_prefix="/sse")

    @sse.function
    def where() -> Iterator[str]:
        yield request.path

    app = Flask(__name__)
    sse.init_app(app)
    sse.init_app(blueprint)
    app.register_blueprint(blueprint)
    client = app.test_client()
    assert events(client, "/sse/where") == ["/sse/where"]
    assert events(client, "/tenant/sse/where") == ["/tenant/sse/where"]
    with app.test_request_context():
        assert url_for("tenant.sse_run_call/sse", name="where") == "/tenant/sse/where"


def test_settings_auth_and_runs_come_from_each_app_that_registers_the_blueprint() -> None:
    blueprint, _ = counting_blueprint()
    plain, strict = Flask(__name__), Flask(__name__)
    strict.config.update(SSE_RUN_END_EVENT="done", SSE_RUN_AUTH_TOKENS=["s" * 16], SSE_RUN_MAX_BODY=64)
    plain.register_blueprint(blueprint)
    strict.register_blueprint(blueprint)
    assert plain.extensions["sse_run"] is not strict.extensions["sse_run"]
    assert plain.extensions["sse_run"].runs is not strict.extensions["sse_run"].runs

    assert events(plain.test_client(), "/api/count", json={"n": 1}) == ["api:0"]
    strict_client = strict.test_client()
    assert strict_client.post("/api/count", json={"n": 1}).status_code == 401
    token = {"Authorization": "Bearer " + "s" * 16}
    done = stream_events(strict_client, "/api/count", json={"n": 1}, headers=token)[-1]
    assert (done.event, done.data) == ("done", "")
    too_big = strict_client.post("/api/count", json={"n": 1, "pad": "x" * 64}, headers=token)
    assert too_big.status_code == 413


def test_a_blueprint_registered_twice_on_one_app_serves_both_prefixes_as_both_names() -> None:
    blueprint, _ = counting_blueprint()
    seen: list[str | None] = []
    blueprint.before_request(lambda: seen.append(request.blueprint))
    app = Flask(__name__)
    app.register_blueprint(blueprint, url_prefix="/v1")
    app.register_blueprint(blueprint, name="v2", url_prefix="/v2")
    client = app.test_client()
    assert events(client, "/v1/count", json={"n": 1}) == ["api:0"]
    assert events(client, "/v2/count", json={"n": 1}) == ["v2:0"]
    assert seen == ["api", "v2"]  # the blueprint's hook ran for both registrations
    assert client.post("/api/count").status_code == 404


def test_a_second_registration_at_the_same_prefix_is_refused() -> None:
    blueprint, _ = counting_blueprint()
    app = Flask(__name__)
    app.register_blueprint(blueprint)
    with pytest.raises(RuntimeError, match="already registered on this app at '/api'"):
        app.register_blueprint(blueprint, name="again")


def test_a_blueprint_at_the_root_collides_with_an_instance_on_the_app() -> None:
    app = Flask(__name__)
    SSERun(app)
    blueprint, _ = counting_blueprint(url_prefix=None)
    with pytest.raises(RuntimeError, match="already registered on this app at '/'"):
        app.register_blueprint(blueprint)


def test_two_instances_on_one_blueprint_need_their_own_url_prefix() -> None:
    blueprint, _ = counting_blueprint()
    other = SSERun(blueprint, url_prefix="/other")

    @other.function
    def count() -> Iterator[str]:
        yield "other"

    SSERun(blueprint)
    app = Flask(__name__)
    with pytest.raises(RuntimeError, match="already registered"):
        app.register_blueprint(blueprint)
    fine = Blueprint("fine", __name__, url_prefix="/fine")
    first, second = SSERun(fine), SSERun(fine, url_prefix="/other")
    first.function(name="count")(lambda: iter(["first"]))
    second.function(name="count")(lambda: iter(["second"]))
    app = Flask(__name__)
    app.register_blueprint(fine)
    assert events(app.test_client(), "/fine/count") == ["first"]
    assert events(app.test_client(), "/fine/other/count") == ["second"]


def test_init_app_twice_on_one_blueprint_or_after_its_registration_is_refused() -> None:
    blueprint, sse = counting_blueprint()
    with pytest.raises(RuntimeError, match="already on this blueprint"):
        sse.init_app(blueprint)
    Flask(__name__).register_blueprint(blueprint)
    with pytest.raises(AssertionError, match="already been registered"):  # Flask's own check
        SSERun(blueprint)


def test_nested_blueprints_mount_below_both_prefixes_behind_both_hooks() -> None:
    parent = Blueprint("parent", __name__, url_prefix="/parent")
    child, _ = counting_blueprint("child", "/child")
    hooks: list[str] = []
    parent.before_request(lambda: hooks.append("parent"))
    child.before_request(lambda: hooks.append("child"))
    parent.register_blueprint(child)
    app = Flask(__name__)
    app.register_blueprint(parent)
    assert events(app.test_client(), "/parent/child/count", json={"n": 1}) == ["parent.child:0"]
    assert hooks == ["parent", "child"]


def test_a_blueprints_subdomain_applies() -> None:
    blueprint, _ = counting_blueprint(url_prefix=None)
    blueprint.subdomain = "stream"
    app = Flask(__name__, subdomain_matching=True)
    app.config["SERVER_NAME"] = "example.test"
    app.register_blueprint(blueprint)
    client = app.test_client()
    assert events(client, "http://stream.example.test/count", json={"n": 1}) == ["api:0"]
    assert client.post("http://example.test/count", json={"n": 1}).status_code == 404
    with app.app_context():
        assert url_for("api.sse_run_call", name="count") == "http://stream.example.test/count"


# --- url_defaults and URL values -----------------------------------------------------------------


def tenant_blueprint() -> Blueprint:
    """A blueprint whose prefix names the tenant, as Flask's URL processors pattern does."""
    blueprint = Blueprint("tenant", __name__, url_prefix="/<tenant>")
    sse = SSERun(blueprint)

    @blueprint.url_value_preprocessor
    def pull_tenant(endpoint: str | None, values: dict[str, Any] | None) -> None:
        g.tenant = values.pop("tenant") if values else None

    @blueprint.url_defaults
    def add_tenant(endpoint: str, values: dict[str, Any]) -> None:
        if "tenant" in g:
            values.setdefault("tenant", g.tenant)

    @sse.function(resumable=True)
    def hello(who: str) -> Iterator[str]:
        yield f"{who} at {g.tenant}: {url_for('.sse_run_call', name='hello')}"

    return blueprint


def test_prefix_values_reach_the_value_preprocessor_and_url_defaults_fill_url_for() -> None:
    app = Flask(__name__)
    app.register_blueprint(tenant_blueprint())
    client = app.test_client()
    assert events(client, "/acme/hello", json={"who": "ann"}) == ["ann at acme: /acme/hello"]
    assert events(client, "/globex/hello", json={"who": "bob"}) == ["bob at globex: /globex/hello"]


def test_url_defaults_of_a_registration_reach_the_view_args() -> None:
    app = Flask(__name__)
    blueprint = Blueprint("fixed", __name__)
    sse = SSERun(blueprint)

    @sse.function
    def tenant() -> Iterator[str]:
        values = request.view_args or {}
        yield f"{values['tenant']} {values['name']}"

    app.register_blueprint(blueprint, url_prefix="/acme", url_defaults={"tenant": "acme"})
    app.register_blueprint(blueprint, name="globex", url_prefix="/globex", url_defaults={"tenant": "globex"})
    client = app.test_client()
    assert events(client, "/acme/tenant") == ["acme tenant"]
    assert events(client, "/globex/tenant") == ["globex tenant"]


def test_a_run_under_a_prefix_with_values_is_reachable_under_those_values_only() -> None:
    app = Flask(__name__)
    app.register_blueprint(tenant_blueprint())
    client = app.test_client()
    started = client.post("/acme/hello", json={"who": "ann"}, headers={"Prefer": "respond-async"})
    assert started.status_code == 202
    run_id = started.get_json()["run_id"]
    assert started.headers["Location"] == f"/acme/runs/{run_id}"
    followed = client.get(f"/acme/runs/{run_id}")
    assert [event.data for event in parse_events(followed.data)] == ["ann at acme: /acme/hello"]
    assert client.get(f"/globex/runs/{run_id}").status_code == 404
    assert client.post("/globex/hello", headers={"Last-Event-ID": f"{run_id}:0"}).status_code == 204


# --- hooks and error handlers --------------------------------------------------------------------


class Untouchable(io.RawIOBase):
    """A request body that fails the test if anything reads it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read")


def unread_body(length: int) -> dict[str, Any]:
    """A JSON body of ``length`` bytes that fails the test if anything reads it."""
    return {"wsgi.input": Untouchable(), "CONTENT_LENGTH": str(length), "CONTENT_TYPE": "application/json"}


def guarded_app(**config: Any) -> tuple[Flask, list[str]]:
    """``/t/<tenant>/run``: the tenant is looked up before the request (LookupError: 404; a
    closed one: 403 raised, or 401 returned for ``guest``), both answered by the blueprint's
    error handlers."""
    blueprint = Blueprint("tenants", __name__, url_prefix="/t/<tenant>")
    sse = SSERun(blueprint)
    calls: list[str] = []

    @blueprint.before_request
    def look_up_tenant() -> Any:
        tenant = (request.view_args or {}).get("tenant")
        if tenant == "guest":
            return {"error": "log in first"}, 401
        if tenant not in ("acme", "closed"):
            raise LookupError(tenant)
        if tenant == "closed":
            abort(403)
        return None

    @blueprint.errorhandler(Forbidden)
    def forbidden(exc: Forbidden) -> Any:
        return {"error": "this tenant is closed"}, 403

    @blueprint.errorhandler(LookupError)
    def unknown_tenant(exc: LookupError) -> Any:
        return {"error": "no such tenant"}, 404

    @sse.function
    def run(n: int) -> Iterator[int]:
        calls.append("run")
        yield from range(n)

    app = Flask(__name__)
    app.config.update(config)
    app.register_blueprint(blueprint)
    return app, calls


@pytest.mark.parametrize(
    ("tenant", "status", "body"),
    [
        ("closed", 403, {"error": "this tenant is closed"}),
        ("guest", 401, {"error": "log in first"}),
        ("nowhere", 404, {"error": "no such tenant"}),
    ],
)
def test_a_refusing_hook_is_answered_by_the_blueprint_before_the_body_is_read(
    tenant: str, status: int, body: dict[str, str]
) -> None:
    app, calls = guarded_app()
    response = app.test_client().post(f"/t/{tenant}/run", environ_overrides=unread_body(50))
    assert (response.status_code, response.get_json()) == (status, body)
    assert calls == []


def test_a_refusing_hook_wins_over_a_body_too_large_and_the_extensions_auth() -> None:
    app, calls = guarded_app(SSE_RUN_MAX_BODY=10, SSE_RUN_AUTH_TOKENS=["t" * 16])
    client = app.test_client()
    refused = client.post("/t/closed/run", environ_overrides=unread_body(10**12))
    assert refused.status_code == 403
    # Past the hook, the extension's own checks come as before: auth, then the body's size.
    assert client.post("/t/acme/run", json={"n": 1}).status_code == 401
    token = {"Authorization": "Bearer " + "t" * 16}
    assert client.post("/t/acme/run", json={"n": 1, "pad": "x" * 20}, headers=token).status_code == 413
    assert events(client, "/t/acme/run", json={"n": 2}, headers=token) == ["0", "1"]
    assert calls == ["run"]


def test_an_error_raised_by_a_hook_on_options_and_other_methods_goes_to_the_blueprints_handler() -> None:
    app, _ = guarded_app()
    client = app.test_client()
    for method in ("OPTIONS", "GET", "DELETE"):
        response = client.open("/t/closed/run", method=method)
        assert (response.status_code, response.get_json()) == (403, {"error": "this tenant is closed"})
    assert client.options("/t/acme/run").status_code == 204


# --- openapi.json ----------------------------------------------------------------------------------


def test_openapi_json_documents_every_mount_with_path_parameters_for_prefix_values() -> None:
    app = Flask(__name__)
    root = SSERun(app)
    root.function(name="count")(lambda n: iter(range(n)))
    blueprint, _ = counting_blueprint()
    app.register_blueprint(blueprint, url_prefix="/v1")
    app.register_blueprint(blueprint, name="v2", url_prefix="/v2")
    ints = Blueprint("orgs", __name__, url_prefix="/orgs/<int:org>/<tenant>")
    SSERun(ints).function(name="count")(lambda n: iter(range(n)))
    app.register_blueprint(ints)
    client = app.test_client()
    doc = client.get("/v2/openapi.json").get_json()
    assert doc == client.get("/openapi.json").get_json()  # one document, served at every mount
    assert [error.message for error in OpenAPIV31SpecValidator(doc).iter_errors()] == []
    mounts = ("", "/v1", "/v2", "/orgs/{org}/{tenant}")
    assert set(doc["paths"]) == {
        "/count",
        "/v1/count",
        "/v2/count",
        "/v1/runs/{run_id}",
        "/v2/runs/{run_id}",
        "/orgs/{org}/{tenant}/count",
        *(f"{mount}/channels" for mount in mounts),  # every mount serves the app's channels
        *(f"{mount}/channels/{{channel}}" for mount in mounts),
    }
    channel = doc["paths"]["/orgs/{org}/{tenant}/channels/{channel}"]["get"]
    assert channel["operationId"] == "orgs_org_tenant_channels_channel_get"
    assert [p["name"] for p in channel["parameters"] if p["in"] == "path"] == ["org", "tenant", "channel"]
    assert doc["paths"]["/v2/count"]["get"]["operationId"] == "v2_count_get"
    assert doc["paths"]["/v1/runs/{run_id}"]["delete"]["operationId"] == "v1_runs_delete"
    org = doc["paths"]["/orgs/{org}/{tenant}/count"]["post"]
    assert org["operationId"] == "orgs_org_tenant_count"
    assert [p for p in org["parameters"] if p["in"] == "path"] == [
        {"name": "org", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
        {"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    # The blueprint's functions are named after it, apart from the app's own.
    assert doc["paths"]["/v1/count"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/api_count_parameters"
    }


def test_a_runs_path_below_prefix_values_documents_them() -> None:
    app = Flask(__name__)
    app.register_blueprint(tenant_blueprint())
    doc = app.test_client().get("/acme/openapi.json").get_json()
    assert [error.message for error in OpenAPIV31SpecValidator(doc).iter_errors()] == []
    runs = doc["paths"]["/{tenant}/runs/{run_id}"]
    for operation in runs.values():
        assert [p["name"] for p in operation["parameters"] if p["in"] == "path"] == ["tenant", "run_id"]


def test_schema_names_do_not_depend_on_when_functions_were_registered() -> None:
    early, late = SSERun(), Blueprint("api", __name__)
    early.function(name="count")(lambda n: n)
    early.init_app(late)
    early.function(name="other")(lambda n: n)
    assert early.functions["count"].binder.model.__name__ == "api_count_parameters"
    assert early.functions["other"].binder.model.__name__ == "api_other_parameters"


def test_resumable_runs_live_under_the_prefix_of_the_registration_that_started_them() -> None:
    blueprint, _ = counting_blueprint()
    app = Flask(__name__)
    app.register_blueprint(blueprint, url_prefix="/v1")
    app.register_blueprint(blueprint, name="v2", url_prefix="/v2")
    client = app.test_client()
    started = client.post("/v1/count", json={"n": 3}, headers={"Prefer": "respond-async"})
    run_id = started.get_json()["run_id"]
    assert started.headers["Location"] == started.get_json()["events"] == f"/v1/runs/{run_id}"
    followed = client.get(f"/v1/runs/{run_id}?last_event_id=1")
    assert [(e.id, e.data) for e in parse_events(followed.data)] == [
        (f"{run_id}:2", "api:1"),
        (f"{run_id}:3", "api:2"),
    ]
    resumed = client.post("/v1/count", headers={"Last-Event-ID": f"{run_id}:2"})
    assert [e.data for e in parse_events(resumed.data)] == ["api:2"]
    # Another registration's URLs do not reach it, as another url_prefix would not.
    assert client.get(f"/v2/runs/{run_id}").status_code == 404
    assert client.post("/v2/count", headers={"Last-Event-ID": f"{run_id}:2"}).status_code == 204
    assert client.delete(f"/v1/runs/{run_id}").status_code == 204


# --- under gunicorn ------------------------------------------------------------------------------


def post_and_wait(port: int, path: str) -> tuple[str, float]:
    """POST ``path`` announcing a 100 kB body but sending 7 bytes of it; return the status line
    and the seconds it took to come."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\nConnection: close\r\n\r\n".encode()
            + b'{"n": 1'
        )
        status = sock.makefile("rb").readline().decode().strip()
        return status, time.monotonic() - started


def test_live_a_refusing_hook_answers_at_once_while_the_body_never_arrives(tmp_path: Path) -> None:
    config = {"TEST_APP_CONFIG": json.dumps({"SSE_RUN_BODY_TIMEOUT": 2})}
    with gunicorn("tests.blueprint_app:create_app()", tmp_path=tmp_path, env=config) as server:
        refused, refused_after = post_and_wait(server.port, "/t/closed/ticks")
        unknown, unknown_after = post_and_wait(server.port, "/t/nowhere/ticks")
        # Past the hook, the view waits for the body: the body timeout's 408.
        waited, waited_after = post_and_wait(server.port, "/t/acme/ticks")
    assert refused == "HTTP/1.1 403 FORBIDDEN" and refused_after < 1
    assert unknown == "HTTP/1.1 404 NOT FOUND" and unknown_after < 1
    assert waited == "HTTP/1.1 408 REQUEST TIMEOUT" and 1.5 < waited_after < 5
