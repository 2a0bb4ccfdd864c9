from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import requests
from flask import Flask
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from pydantic import BaseModel, Field, create_model

from flask_sse_run import SSERun
from flask_sse_run.openapi import build_document
from tests.apps import create_app
from tests.live import gunicorn

TOKEN = "openapi-test-token-0123"
#: The channels' paths, which every instance serves and documents.
CHANNEL_PATHS = ["/channels", "/channels/{channel}"]


# Models live at module level: with postponed annotations, a function's hints must resolve there.
class Options(BaseModel):
    depth: int


# Two different models that pydantic would both call "Options".
OptionsA = create_model("Options", a=(int, ...))
OptionsB = create_model("Options", b=(int, ...))


def document(app: Flask, prefix: str = "", **kwargs: Any) -> dict[str, Any]:
    response = app.test_client().get(f"{prefix}/openapi.json", **kwargs)
    assert response.status_code == 200
    assert response.content_type == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def assert_valid(doc: dict[str, Any]) -> None:
    errors = [error.message for error in OpenAPIV31SpecValidator(doc).iter_errors()]
    assert errors == []


def matches(doc: dict[str, Any], schema: dict[str, Any], instance: Any) -> bool:
    # The document's refs are "#/components/...": validate from a root that holds them.
    return bool(OAS31Validator({**schema, "components": doc["components"]}).is_valid(instance))


def response_schema(
    doc: dict[str, Any], path: str, status: int, media: str = "application/json", method: str = "post"
) -> Any:
    schema: dict[str, Any] = doc["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]
    return schema


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def parameters(operation: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in operation["parameters"] if p["in"] == where}


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node``, or what its local ``$ref`` (a JSON pointer into ``doc``) points at."""
    if "$ref" not in node:
        return node
    target: Any = doc
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return resolve(doc, target)


def assert_documented(doc: dict[str, Any], path: str, method: str, response: Any) -> None:
    """The response's status, media type, body and headers are what the document says."""
    documented = doc["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, response.status_code
    spec = resolve(doc, documented[str(response.status_code)])
    media = response.mimetype
    if response.status_code == 204:
        assert "content" not in spec and response.data == b"" and not media
    else:
        assert media in spec["content"]
        if media == "application/json":
            assert matches(doc, spec["content"][media]["schema"], response.get_json())
    for name, header in spec.get("headers", {}).items():
        header = resolve(doc, header)
        value = response.headers.get(name)
        if header.get("required"):
            assert value is not None, name
        if value is not None:
            assert matches(doc, header["schema"], value), (name, value)


def sse_events(body: bytes) -> list[dict[str, str]]:
    """The events of a stream as EventSource sees them (comments dropped)."""
    events = []
    for block in body.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = f"{fields[name]}\n{value}" if name in fields else value
        if fields:
            events.append(fields)
    return events


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document(create_app())
    assert doc["openapi"] == "3.1.0"
    assert_valid(doc)


def test_the_document_is_valid_with_auth_a_prefix_and_nested_models() -> None:
    app = Flask(__name__)
    app.config["SSE_RUN_AUTH_TOKENS"] = [TOKEN]
    sse = SSERun(app, url_prefix="/api/v1")

    @sse.function
    def nested(inner: Options, items: list[Options] | None = None) -> Iterator[int]:
        yield inner.depth

    doc = document(app, "/api/v1")
    assert_valid(doc)
    assert list(doc["paths"]) == ["/api/v1/channels", "/api/v1/channels/{channel}", "/api/v1/nested"]


def test_each_function_is_a_post_operation_whose_body_is_its_signature() -> None:
    doc = document(create_app())
    assert list(doc["paths"]) == [
        "/bad_close", "/big", "/blocking_ticks", "/burst_then_wait", "/busy_after_first", *CHANNEL_PATHS,
        "/count", "/endless", "/events", "/fail_after", "/firehose", "/plain", "/plain_sleeper",
        "/resumable_fail", "/resumable_ticks", "/run", "/runs/{run_id}", "/shared_ticks", "/sleeper",
        "/ticks", "/watcher", "/whoami",
    ]  # fmt: skip
    operation = doc["paths"]["/count"]["post"]
    assert list(doc["paths"]["/count"]) == ["post"]
    assert operation["operationId"] == "count"
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["properties"]["n"]["type"] == "integer"
    assert body["properties"]["delay"] == {"default": 0.0, "title": "Delay", "type": "number"}
    assert body["required"] == ["n"]
    assert body["additionalProperties"] is False
    assert operation["requestBody"]["required"] is True


def test_a_function_without_required_parameters_accepts_no_body() -> None:
    operation = document(create_app())["paths"]["/events"]["post"]
    assert operation["requestBody"]["required"] is False


def test_pydantic_defs_are_hoisted_into_components_with_refs_rewritten() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def configured(options: Options, more: list[Options]) -> None: ...

    doc = document(app)
    assert "$defs" not in str(doc)
    body = doc["components"]["schemas"]["configured_parameters"]
    assert body["properties"]["options"] == {"$ref": "#/components/schemas/Options"}
    assert body["properties"]["more"]["items"] == {"$ref": "#/components/schemas/Options"}
    assert doc["components"]["schemas"]["Options"]["properties"]["depth"]["type"] == "integer"


def test_two_models_with_one_name_get_two_components() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def one(options: OptionsA) -> None: ...  # type: ignore[valid-type]

    @sse.function
    def two(options: OptionsB) -> None: ...  # type: ignore[valid-type]

    doc = document(app)
    schemas = doc["components"]["schemas"]
    one_ref = schemas["one_parameters"]["properties"]["options"]["$ref"]
    two_ref = schemas["two_parameters"]["properties"]["options"]["$ref"]
    assert one_ref != two_ref
    assert set(schemas[one_ref.rsplit("/", 1)[1]]["properties"]) == {"a"}
    assert set(schemas[two_ref.rsplit("/", 1)[1]]["properties"]) == {"b"}


def test_docstrings_and_fields_describe_the_operation_and_its_parameters() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def described(
        count: int,
        label: Annotated[str, Field(description="From the Field.")] = "x",
        silent: bool = False,
    ) -> Iterator[str]:
        """Count things out loud.

        Longer text about counting.

        Args:
            count: how many things,
                over two lines.
            label: from the docstring (the Field wins).
        """
        yield label

    operation = document(app)["paths"]["/described"]["post"]
    assert operation["summary"] == "Count things out loud."
    assert operation["description"].startswith("Count things out loud.\n\nLonger text about counting.")
    props = document(app)["components"]["schemas"]["described_parameters"]["properties"]
    assert props["count"]["description"] == "how many things, over two lines."
    assert props["label"]["description"] == "From the Field."
    assert "description" not in props["silent"]


def test_generators_may_stream_and_plain_functions_answer_json() -> None:
    doc = document(create_app())
    assert list(doc["paths"]["/count"]["post"]["responses"]["200"]["content"]) == [
        "text/event-stream",
        "application/json",
    ]
    assert list(doc["paths"]["/plain"]["post"]["responses"]["200"]["content"]) == ["application/json"]


def test_an_async_iterator_return_annotation_is_not_documented_as_a_stream() -> None:
    # Nothing async is served (async functions are refused at registration); a plain function
    # annotated to return an async iterator answers JSON at best.
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function
    def handle() -> AsyncIterator[str]:
        raise NotImplementedError

    content = document(app)["paths"]["/handle"]["post"]["responses"]["200"]["content"]
    assert list(content) == ["application/json"]


def test_the_event_stream_response_documents_the_event_format() -> None:
    doc = document(create_app(SSE_RUN_END_EVENT="done"))
    content = doc["paths"]["/count"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert "event: error" in content["schema"]["description"]
    assert "`event: done`" in content["schema"]["description"]
    event = content["schema"]
    assert matches(doc, event, {"data": '{"i":0}', "event": "message"})
    assert not matches(doc, event, {"event": "message"})


def test_every_error_status_is_documented_with_its_body() -> None:
    doc = document(create_app())
    responses = doc["paths"]["/run"]["post"]["responses"]
    assert sorted(responses) == ["200", "400", "406", "408", "413", "415", "422", "500", "503"]
    for status in ("400", "406", "408", "413", "415", "500", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/SSERun.Error"
        }
    assert responses["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SSERun.ValidationError"
    }
    assert set(doc["components"]["responses"]) == {"404", "405"}
    assert "Allow" in doc["components"]["responses"]["405"]["headers"]


def test_no_408_is_documented_when_the_body_timeout_is_off() -> None:
    doc = document(create_app(SSE_RUN_BODY_TIMEOUT=0))
    assert "408" not in doc["paths"]["/run"]["post"]["responses"]


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        ("/run", {"data": b"{", "content_type": "application/json"}, 400),
        ("/run", {"json": {"upper_range": 1}, "headers": {"Accept": "text/html"}}, 406),
        ("/run", {"data": b"{}", "content_type": "text/plain"}, 415),
        ("/run", {"json": {"upper_range": "x", "extra": 1}}, 422),
        ("/fail_after", {"json": {"n": 1}, "headers": {"Accept": "application/json"}}, 500),
        ("/count", {"json": {"n": 2}, "headers": {"Accept": "application/json"}}, 200),
        ("/plain", {"json": {"a": 1}}, 200),
    ],
)
def test_real_responses_match_their_documented_schemas(
    path: str, kwargs: dict[str, Any], status: int
) -> None:
    app = create_app()
    doc = document(app)
    response = app.test_client().post(path, **kwargs)
    assert response.status_code == status
    assert matches(doc, response_schema(doc, path, status), response.get_json())


def test_a_too_large_body_matches_the_documented_413() -> None:
    app = create_app(SSE_RUN_MAX_BODY=10)
    doc = document(app)
    response = app.test_client().post("/run", json={"upper_range": 1, "pad": "x" * 20})
    assert response.status_code == 413
    assert matches(doc, response_schema(doc, "/run", 413), response.get_json())


def test_auth_declares_the_bearer_scheme_and_public_functions_opt_out() -> None:
    app = Flask(__name__)
    app.config["SSE_RUN_AUTH_TOKENS"] = [TOKEN]
    sse = SSERun(app)

    @sse.function
    def private() -> Iterator[str]:
        yield "x"

    @sse.function(public=True)
    def open_to_all() -> Iterator[str]:
        yield "x"

    doc = document(app)
    assert doc["components"]["securitySchemes"] == {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "A static token from SSE_RUN_AUTH_TOKENS or a JWT signed with SSE_RUN_JWT_KEY.",
        }
    }
    assert doc["security"] == [{"bearerAuth": []}]
    assert "security" not in doc["paths"]["/private"]["post"]
    assert "401" in doc["paths"]["/private"]["post"]["responses"]
    assert doc["paths"]["/open_to_all"]["post"]["security"] == []
    assert "401" not in doc["paths"]["/open_to_all"]["post"]["responses"]
    assert "WWW-Authenticate" in doc["paths"]["/private"]["post"]["responses"]["401"]["headers"]


def test_a_jwt_only_scheme_says_its_format() -> None:
    doc = document(create_app(SSE_RUN_JWT_KEY="k" * 32))
    assert doc["components"]["securitySchemes"]["bearerAuth"]["bearerFormat"] == "JWT"


def test_without_auth_there_is_no_security_scheme() -> None:
    doc = document(create_app())
    assert "security" not in doc and "securitySchemes" not in doc["components"]
    assert all("401" not in operation["responses"] for _, _, operation in operations(doc))


def test_the_document_is_public_when_auth_is_on() -> None:
    app = create_app(SSE_RUN_AUTH_TOKENS=[TOKEN])
    assert app.test_client().post("/run", json={"upper_range": 0}).status_code == 401
    assert_valid(document(app))


@pytest.mark.parametrize("method", ["POST", "DELETE", "TRACE"])
def test_openapi_json_wins_over_the_function_rule_and_refuses_other_methods(method: str) -> None:
    client = create_app().test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.head("/openapi.json").status_code == 200
    response = client.open("/openapi.json", method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert response.get_json() == {"error": "this endpoint accepts GET only"}


def test_options_on_openapi_json_is_204_with_allow() -> None:
    response = create_app().test_client().options("/openapi.json")
    assert response.status_code == 204
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS"


def test_functions_registered_after_the_first_request_appear() -> None:
    app = Flask(__name__)
    sse = SSERun(app)
    assert list(document(app)["paths"]) == CHANNEL_PATHS  # served by every instance

    @sse.function
    def late() -> Iterator[str]:
        yield "late"

    assert list(document(app)["paths"]) == [*CHANNEL_PATHS, "/late"]


def test_title_version_and_server_come_from_config_and_the_request() -> None:
    app = create_app(SSE_RUN_OPENAPI_TITLE="Counting API", SSE_RUN_OPENAPI_VERSION="2.1.0")
    doc = document(app, environ_overrides={"SCRIPT_NAME": "/mounted"})
    assert doc["info"] == {"title": "Counting API", "version": "2.1.0"}
    assert doc["servers"] == [{"url": "/mounted"}]
    default = document(create_app())
    assert default["info"]["title"] == "tests.apps" and default["servers"] == [{"url": "/"}]


def test_build_document_is_usable_without_a_request() -> None:
    from flask_sse_run.config import Settings
    from tests.apps import sse

    doc = build_document(sse.functions, Settings(), url_prefix="/x", title="t")
    assert "/x/run" in doc["paths"]
    assert_valid(doc)


def test_the_live_server_serves_the_document_to_requests_and_curl(tmp_path: Path) -> None:
    with gunicorn("wsgi:app", tmp_path=tmp_path) as server:
        # No keep-alive: an idle connection would hold up gunicorn's graceful stop for seconds.
        response = requests.get(f"{server.url}/openapi.json", headers={"Connection": "close"}, timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        doc = response.json()
        assert_valid(doc)
        operation = doc["paths"]["/run"]["post"]
        assert operation["summary"].startswith("Count to")
        assert doc["components"]["schemas"]["run_parameters"]["properties"]["upper_range"]["description"]
        if shutil.which("curl"):
            started = time.monotonic()
            output = subprocess.run(
                ["curl", "-sS", "--fail", f"{server.url}/openapi.json"],
                capture_output=True,
                timeout=10,
                check=True,
            ).stdout
            assert b'"openapi": "3.1.0"' in output and time.monotonic() - started < 5


def test_every_instance_of_the_app_is_documented_with_unique_names() -> None:
    from example_app import create_app as create_example_app

    doc = document(create_example_app())
    assert_valid(doc)
    assert {"/run", "/falcon/run"} <= set(doc["paths"])
    assert doc["paths"]["/run"]["post"]["operationId"] == "run"
    assert doc["paths"]["/falcon/run"]["post"]["operationId"] == "falcon_run"
    falcon_ref = doc["paths"]["/falcon/run"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert falcon_ref == {"$ref": "#/components/schemas/falcon_run_parameters"}
    assert "prompt" in doc["components"]["schemas"]["falcon_run_parameters"]["properties"]


# --- GET, resumable runs and /runs ---------------------------------------------------------------

UNKNOWN_RUN = "0" * 32


def test_a_function_served_with_get_has_a_get_operation_with_one_query_parameter_per_property() -> None:
    doc = document(create_app())
    assert list(doc["paths"]["/resumable_ticks"]) == ["get", "post"]
    operation = doc["paths"]["/resumable_ticks"]["get"]
    assert operation["operationId"] == "resumable_ticks_get"
    assert doc["paths"]["/resumable_ticks"]["post"]["operationId"] == "resumable_ticks"
    assert "requestBody" not in operation
    query = parameters(operation, "query")
    assert list(query) == ["n", "interval", "tags"]
    assert query["n"]["required"] is True and query["n"]["schema"]["type"] == "integer"
    assert query["interval"]["required"] is False
    assert query["interval"]["schema"] == {"default": 0.1, "title": "Interval", "type": "number"}
    # ?tags=a&tags=b, and no null: a query string cannot say it (an absent key is the default).
    assert query["tags"]["style"] == "form" and query["tags"]["explode"] is True
    assert query["tags"]["schema"] == {"items": {"type": "string"}, "title": "Tags", "type": "array"}
    assert "style" not in query["n"]
    # No body is read: no 408, 413 or 415.
    assert not {"408", "413", "415"} & set(operation["responses"])
    assert {"200", "202", "204", "400", "406", "422", "500", "503"} <= set(operation["responses"])


def test_a_get_only_function_has_only_a_get_operation_described_by_its_docstring() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function(methods=("GET",))
    def feed(topic: str, limit: int = 10) -> Iterator[str]:
        """Follow a topic.

        Args:
            topic: what to follow.
        """
        yield topic

    doc = document(app)
    assert_valid(doc)
    assert list(doc["paths"]) == [*CHANNEL_PATHS, "/feed"]  # not resumable: no /runs
    assert list(doc["paths"]["/feed"]) == ["get"]
    operation = doc["paths"]["/feed"]["get"]
    assert operation["operationId"] == "feed_get" and operation["summary"] == "Follow a topic."
    query = parameters(operation, "query")
    assert query["topic"] == {
        "name": "topic",
        "in": "query",
        "required": True,
        "description": "what to follow.",
        "schema": {"title": "Topic", "type": "string"},
    }
    assert query["limit"]["required"] is False and query["limit"]["schema"]["default"] == 10
    # Not resumable: no reconnect, no 202, no 204, and no 400 (nothing is parsed but the query).
    assert set(parameters(operation, "header")) == {"X-Request-ID"}
    assert sorted(operation["responses"]) == ["200", "406", "422", "500", "503"]


def test_optional_query_parameters_drop_null_which_a_query_string_cannot_say() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function(methods=("GET", "POST"))
    def shaped(limit: int | None = None, ids: list[int] | None = None) -> Iterator[str]:
        yield "x"

    doc = document(app)
    assert_valid(doc)
    query = parameters(doc["paths"]["/shaped"]["get"], "query")
    assert query["limit"]["schema"] == {"title": "Limit", "type": "integer"}
    assert query["ids"]["schema"]["items"] == {"type": "integer"}
    # The POST body keeps the schema as pydantic wrote it, null included.
    body = doc["components"]["schemas"]["shaped_parameters"]["properties"]
    assert {"type": "null"} in body["limit"]["anyOf"]


def test_an_enum_parameter_fits_a_query_string() -> None:
    from tests.fuzz_app import create_app as create_fuzz_app

    doc = document(create_fuzz_app())
    query = parameters(doc["paths"]["/spell"]["get"], "query")
    assert query["mode"]["schema"]["$ref"] == "#/components/schemas/Mode"
    assert "description" not in query["mode"]


def test_a_resumable_function_documents_reconnects_prefer_202_204_and_x_run_id() -> None:
    doc = document(create_app())
    for method in ("get", "post"):
        operation = doc["paths"]["/resumable_ticks"][method]
        headers = parameters(operation, "header")
        assert set(headers) == {"X-Request-ID", "Last-Event-ID", "Prefer"}
        last = headers["Last-Event-ID"]
        assert last["required"] is False
        assert matches(doc, last["schema"], "0123456789abcdef0123456789abcdef:12")
        assert not matches(doc, last["schema"], "12")
        assert headers["Prefer"]["examples"]["async"]["value"] == "respond-async"
        responses = operation["responses"]
        assert responses["200"]["headers"]["X-Run-ID"] == {"$ref": "#/components/headers/X-Run-ID"}
        accepted = responses["202"]
        assert {"Location", "Preference-Applied", "X-Run-ID"} <= set(accepted["headers"])
        assert accepted["headers"]["Location"]["required"] is True
        assert accepted["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/SSERun.RunStarted"
        }
        assert "content" not in responses["204"] and "X-Run-ID" in responses["204"]["headers"]
        assert "Last-Event-ID" in responses["400"]["description"]
        assert "SSE_RUN_MAX_RUNS" in responses["503"]["description"]
        assert "SSE_RUN_MAX_BYTES" in responses["503"]["description"]
        assert "Retry-After" in responses["503"]["headers"]
    started = doc["components"]["schemas"]["SSERun.RunStarted"]
    assert matches(doc, started, {"run_id": "0123456789abcdef0123456789abcdef", "events": "/runs/x"})
    assert not matches(doc, started, {"run_id": "not-a-run-id", "events": "/runs/x"})


def test_a_function_that_is_not_resumable_documents_none_of_it() -> None:
    doc = document(create_app())
    operation = doc["paths"]["/count"]["post"]
    assert set(parameters(operation, "header")) == {"X-Request-ID"}
    assert not {"202", "204"} & set(operation["responses"])
    assert "X-Run-ID" not in operation["responses"]["200"]["headers"]
    assert (
        "id: <run_id>"
        not in operation["responses"]["200"]["content"]["text/event-stream"]["schema"]["description"]
    )


def test_sse_run_resumable_makes_streams_resumable_unless_a_function_says_no() -> None:
    app = Flask(__name__)
    app.config["SSE_RUN_RESUMABLE"] = True
    sse = SSERun(app)

    @sse.function
    def stream() -> Iterator[int]:
        yield 1

    @sse.function(resumable=False)
    def never() -> Iterator[int]:
        yield 1

    @sse.function
    def value() -> int:  # returns no iterator: there is no run to resume
        return 1

    doc = document(app)
    assert_valid(doc)
    assert list(doc["paths"]) == [*CHANNEL_PATHS, "/never", "/runs/{run_id}", "/stream", "/value"]
    assert "202" in doc["paths"]["/stream"]["post"]["responses"]
    assert "202" not in doc["paths"]["/never"]["post"]["responses"]
    assert "202" not in doc["paths"]["/value"]["post"]["responses"]


@pytest.mark.parametrize(
    ("config", "resumable", "documented"),
    [
        ({}, None, False),
        ({}, True, True),
        ({"SSE_RUN_RESUMABLE": True}, None, True),
        ({"SSE_RUN_RESUMABLE": True}, False, True),
    ],
)
def test_the_runs_path_is_documented_when_an_instance_may_hold_runs(
    config: dict[str, Any], resumable: bool | None, documented: bool
) -> None:
    app = Flask(__name__)
    app.config.update(config)
    sse = SSERun(app)

    @sse.function(resumable=resumable)
    def stream() -> Iterator[int]:
        yield 1

    doc = document(app)
    assert ("/runs/{run_id}" in doc["paths"]) is documented
    # The route is there either way; what the document promises is what it answers.
    response = app.test_client().get(f"/runs/{UNKNOWN_RUN}")
    assert response.status_code == 404
    if documented:
        assert_documented(doc, "/runs/{run_id}", "get", response)


def test_the_runs_path_has_get_and_delete_qualified_by_each_instance_prefix() -> None:
    app = Flask(__name__)
    plain, api = SSERun(app), SSERun(app, url_prefix="/api-v1")

    @plain.function(resumable=True)
    def one() -> Iterator[int]:
        yield 1

    @api.function(resumable=True)
    def two() -> Iterator[int]:
        yield 2

    doc = document(app)
    assert_valid(doc)
    assert {"/runs/{run_id}", "/api-v1/runs/{run_id}"} <= set(doc["paths"])
    ids = {(path, method): op["operationId"] for path, method, op in operations(doc)}
    assert ids[("/runs/{run_id}", "get")] == "runs_get"
    assert ids[("/runs/{run_id}", "delete")] == "runs_delete"
    assert ids[("/api-v1/runs/{run_id}", "get")] == "api_v1_runs_get"
    assert ids[("/api-v1/runs/{run_id}", "delete")] == "api_v1_runs_delete"
    follow = doc["paths"]["/runs/{run_id}"]["get"]
    assert set(parameters(follow, "path")) == {"run_id"}
    assert parameters(follow, "path")["run_id"]["required"] is True
    assert set(parameters(follow, "query")) == {"last_event_id"}
    assert set(parameters(follow, "header")) == {"Last-Event-ID", "X-Request-ID"}
    position = parameters(follow, "query")["last_event_id"]["schema"]
    assert matches(doc, position, "7") and matches(doc, position, f"{UNKNOWN_RUN}:7")
    assert not matches(doc, position, "-1")
    assert sorted(follow["responses"]) == ["200", "204", "400", "404", "406"]
    assert list(follow["responses"]["200"]["content"]) == ["text/event-stream"]
    cancel = doc["paths"]["/runs/{run_id}"]["delete"]
    assert sorted(cancel["responses"]) == ["204", "404"]


def test_operation_ids_stay_unique_when_names_collide() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @sse.function(methods=("GET", "POST"))
    def run() -> Iterator[int]:
        yield 1

    @sse.function(name="run_get")
    def other() -> Iterator[int]:
        yield 2

    @sse.function(name="runs_get", resumable=True)
    def third() -> Iterator[int]:
        yield 3

    doc = document(app)
    assert_valid(doc)
    ids = {(path, method): op["operationId"] for path, method, op in operations(doc)}
    assert ids[("/run", "post")] == "run" and ids[("/run", "get")] == "run_get"
    assert ids[("/run_get", "post")] == "run_get_2"
    assert ids[("/runs/{run_id}", "get")] == "runs_get"
    assert ids[("/runs_get", "post")] == "runs_get_2"
    assert len(set(ids.values())) == len(ids)


def test_the_event_stream_of_a_run_documents_ids_and_the_missed_event() -> None:
    doc = document(create_app(SSE_RUN_END_EVENT="done"))
    for path, method in [
        ("/resumable_ticks", "post"),
        ("/resumable_ticks", "get"),
        ("/runs/{run_id}", "get"),
    ]:
        schema = response_schema(doc, path, 200, "text/event-stream", method)
        assert "`id: <run_id>:<seq>`" in schema["description"], path
        assert '`event: missed` with data `{"missed": N}`' in schema["description"], path
        assert "`event: done`" in schema["description"], path
        assert matches(doc, schema, {"data": '{"missed":3}', "event": "missed", "id": f"{UNKNOWN_RUN}:4"})
    event = doc["components"]["schemas"]["SSERun.Event"]["properties"]
    assert "`missed`" in event["event"]["description"]
    assert "<run_id>:<seq>" in event["id"]["description"]


def test_the_202_links_to_following_and_cancelling_the_run() -> None:
    app = Flask(__name__)
    sse = SSERun(app, url_prefix="/api")

    @sse.function(resumable=True)
    def job() -> Iterator[int]:
        yield 1

    doc = document(app, "/api")
    links = doc["paths"]["/api/job"]["post"]["responses"]["202"]["links"]
    assert resolve(doc, {"$ref": links["follow"]["operationRef"]})["operationId"] == "api_runs_get"
    assert resolve(doc, {"$ref": links["cancel"]["operationRef"]})["operationId"] == "api_runs_delete"
    assert links["follow"]["parameters"] == {"run_id": "$response.body#/run_id"}


def test_with_auth_the_runs_operations_document_401_and_a_public_function_makes_the_token_optional() -> None:
    app = Flask(__name__)
    app.config["SSE_RUN_AUTH_TOKENS"] = [TOKEN]
    private_sse, public_sse = SSERun(app), SSERun(app, url_prefix="/open")

    @private_sse.function(resumable=True)
    def private() -> Iterator[int]:
        yield 1

    @public_sse.function(resumable=True, public=True)
    def shared() -> Iterator[int]:
        yield 1

    doc = document(app)
    assert_valid(doc)
    for method in ("get", "delete"):
        assert "401" in doc["paths"]["/runs/{run_id}"][method]["responses"]
        assert "security" not in doc["paths"]["/runs/{run_id}"][method]
        assert doc["paths"]["/open/runs/{run_id}"][method]["security"] == [{"bearerAuth": []}, {}]
    client = app.test_client()
    refused = client.get(f"/runs/{UNKNOWN_RUN}")
    assert refused.status_code == 401
    assert_documented(doc, "/runs/{run_id}", "get", refused)


def test_real_get_responses_match_the_document() -> None:
    app = create_app()
    doc = document(app)
    client = app.test_client()
    path = "/resumable_ticks"
    collected = client.get(f"{path}?n=2&interval=0&tags=a&tags=b", headers={"Accept": "application/json"})
    assert collected.status_code == 200
    assert collected.get_json()["result"] == [{"i": 0, "tags": ["a", "b"]}, {"i": 1, "tags": ["a", "b"]}]
    assert_documented(doc, path, "get", collected)
    invalid = client.get(f"{path}?n=x&extra=1")
    assert invalid.status_code == 422
    assert_documented(doc, path, "get", invalid)
    refused = client.get(f"{path}?n=1", headers={"Accept": "text/html"})
    assert refused.status_code == 406
    assert_documented(doc, path, "get", refused)


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_run_streams_events_whose_ids_and_headers_match_the_document(method: str) -> None:
    app = create_app()
    doc = document(app)
    client = app.test_client()
    kwargs: dict[str, Any] = (
        {"query_string": {"n": 3, "interval": 0}} if method == "get" else {"json": {"n": 3, "interval": 0}}
    )
    response = client.open(
        "/resumable_ticks", method=method.upper(), headers={"Accept": "text/event-stream"}, **kwargs
    )
    assert response.status_code == 200
    assert_documented(doc, "/resumable_ticks", method, response)
    run_id = response.headers["X-Run-ID"]
    events = sse_events(response.data)
    event_schema = response_schema(doc, "/resumable_ticks", 200, "text/event-stream", method)
    assert [e["data"] for e in events] == ["0", "1", "2"]
    assert [e["id"] for e in events] == [f"{run_id}:1", f"{run_id}:2", f"{run_id}:3"]
    assert all(matches(doc, event_schema, e) for e in events)
    last_event_id = parameters(doc["paths"]["/resumable_ticks"][method], "header")["Last-Event-ID"]["schema"]
    assert all(matches(doc, last_event_id, e["id"]) for e in events)

    # Reconnect after the first event on the function URL: the rest, documented.
    resumed = client.open(
        "/resumable_ticks", method=method.upper(),
        headers={"Accept": "text/event-stream", "Last-Event-ID": f"{run_id}:1"},
    )  # fmt: skip
    assert resumed.status_code == 200
    assert_documented(doc, "/resumable_ticks", method, resumed)
    assert [e["id"] for e in sse_events(resumed.data)] == [f"{run_id}:2", f"{run_id}:3"]
    # Everything read: 204, documented, with the run's id.
    done = client.open("/resumable_ticks", method=method.upper(), headers={"Last-Event-ID": f"{run_id}:3"})
    assert done.status_code == 204 and done.headers["X-Run-ID"] == run_id
    assert_documented(doc, "/resumable_ticks", method, done)
    unknown = client.open(
        "/resumable_ticks", method=method.upper(), headers={"Last-Event-ID": f"{UNKNOWN_RUN}:1"}
    )
    assert unknown.status_code == 204
    assert_documented(doc, "/resumable_ticks", method, unknown)
    malformed = client.open("/resumable_ticks", method=method.upper(), headers={"Last-Event-ID": "12"})
    assert malformed.status_code == 400
    assert_documented(doc, "/resumable_ticks", method, malformed)


@pytest.mark.parametrize("method", ["get", "post"])
def test_respond_async_answers_the_documented_202_and_the_run_is_followed_and_cancelled_at_its_url(
    method: str,
) -> None:
    app = create_app()
    doc = document(app)
    client = app.test_client()
    kwargs: dict[str, Any] = (
        {"query_string": {"n": 2, "interval": 0}} if method == "get" else {"json": {"n": 2, "interval": 0}}
    )
    started = client.open(
        "/resumable_ticks", method=method.upper(), headers={"Prefer": "respond-async"}, **kwargs
    )
    assert started.status_code == 202
    assert_documented(doc, "/resumable_ticks", method, started)
    run_id = started.get_json()["run_id"]
    assert started.headers["Location"] == started.get_json()["events"] == f"/runs/{run_id}"
    assert started.headers["Preference-Applied"] == "respond-async"

    followed = client.get(f"/runs/{run_id}", headers={"Accept": "text/event-stream"})
    assert followed.status_code == 200
    assert_documented(doc, "/runs/{run_id}", "get", followed)
    assert [e["id"] for e in sse_events(followed.data)] == [f"{run_id}:1", f"{run_id}:2"]
    after_first = client.get(f"/runs/{run_id}?last_event_id=1")
    assert [e["data"] for e in sse_events(after_first.data)] == ["1"]
    assert_documented(doc, "/runs/{run_id}", "get", after_first)
    nothing_left = client.get(f"/runs/{run_id}", headers={"Last-Event-ID": f"{run_id}:2"})
    assert nothing_left.status_code == 204
    assert_documented(doc, "/runs/{run_id}", "get", nothing_left)
    bad_position = client.get(f"/runs/{run_id}?last_event_id=x")
    assert bad_position.status_code == 400
    assert_documented(doc, "/runs/{run_id}", "get", bad_position)
    not_a_stream = client.get(f"/runs/{run_id}", headers={"Accept": "application/json"})
    assert not_a_stream.status_code == 406
    assert_documented(doc, "/runs/{run_id}", "get", not_a_stream)

    cancelled = client.delete(f"/runs/{run_id}")
    assert cancelled.status_code == 204
    assert_documented(doc, "/runs/{run_id}", "delete", cancelled)


@pytest.mark.parametrize("method", ["get", "delete"])
@pytest.mark.parametrize("run_id", [UNKNOWN_RUN, "not-a-run-id"])
def test_an_unknown_run_is_the_documented_404(method: str, run_id: str) -> None:
    app = create_app()
    doc = document(app)
    response = app.test_client().open(f"/runs/{run_id}", method=method.upper())
    assert response.status_code == 404
    assert response.get_json() == {"error": "no such run"}
    assert_documented(doc, "/runs/{run_id}", method, response)


def test_the_example_app_documents_run_for_get_and_post_and_its_runs() -> None:
    from example_app import create_app as create_example_app

    doc = document(create_example_app())
    assert_valid(doc)
    assert list(doc["paths"]["/run"]) == ["get", "post"]
    assert doc["paths"]["/run"]["get"]["operationId"] == "run_get"
    assert parameters(doc["paths"]["/run"]["get"], "query")["upper_range"]["required"] is True
    assert {"/runs/{run_id}", "/falcon/run", "/falcon/runs/{run_id}"} <= set(doc["paths"])
    # The Falcon run is resumable and served with GET (the page's EventSource) too.
    assert list(doc["paths"]["/falcon/run"]) == ["get", "post"]
    assert doc["paths"]["/falcon/run"]["get"]["operationId"] == "falcon_run_get"
    assert list(doc["paths"]["/falcon/runs/{run_id}"]) == ["get", "delete"]


# --- channels -------------------------------------------------------------------------------------


def test_every_instance_documents_its_channels_with_qualified_operation_ids() -> None:
    app = Flask(__name__)
    plain, api = SSERun(app), SSERun(app, url_prefix="/api-v1")

    @plain.function
    def one() -> Iterator[int]:
        yield 1

    doc = document(app)
    assert_valid(doc)
    assert api.functions == {}  # an instance without functions still serves channels
    ids = {(path, method): op["operationId"] for path, method, op in operations(doc)}
    assert {key: value for key, value in ids.items() if "channels" in key[0]} == {
        ("/channels", "get"): "channels_get",
        ("/channels/{channel}", "get"): "channels_channel_get",
        ("/api-v1/channels", "get"): "api_v1_channels_get",
        ("/api-v1/channels/{channel}", "get"): "api_v1_channels_channel_get",
    }
    one_channel, several = doc["paths"]["/channels/{channel}"]["get"], doc["paths"]["/channels"]["get"]
    assert set(parameters(one_channel, "path")) == {"channel"}
    assert set(parameters(one_channel, "query")) == {"last_event_id"}
    assert set(parameters(one_channel, "header")) == {"Last-Event-ID", "X-Request-ID"}
    assert set(parameters(several, "query")) == {"channel", "last_event_id"}
    named = parameters(several, "query")["channel"]
    assert named["required"] is True and (named["style"], named["explode"]) == ("form", True)
    assert named["schema"]["maxItems"] == 32
    name = parameters(one_channel, "path")["channel"]["schema"]
    assert matches(doc, name, "user:42") and matches(doc, name, "a" * 200)
    assert not matches(doc, name, "bad name") and not matches(doc, name, "a" * 201)
    assert matches(doc, named["schema"], ["news", "user:42"]) and not matches(doc, named["schema"], [])
    position = parameters(one_channel, "header")["Last-Event-ID"]["schema"]
    assert matches(doc, position, "news:12") and matches(doc, position, "news:12,user:42:7")
    assert not matches(doc, position, "12") and not matches(doc, position, "news:-1")
    assert parameters(several, "query")["last_event_id"]["schema"] == position
    for operation in (one_channel, several):
        # No auth and no callback: no 401 and no 403.
        assert sorted(operation["responses"]) == ["200", "400", "406", "503"]
        assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
        assert "Retry-After" in operation["responses"]["503"]["headers"]
        stream = response_schema(doc, "/channels/{channel}", 200, "text/event-stream", "get")
        assert "`news:12,user:42:7`" in stream["description"]
        assert '`event: missed` with data `{"channel": "<channel>", "missed": N}`' in stream["description"]


def test_with_auth_and_a_channel_auth_callback_the_channels_document_401_and_403() -> None:
    app = Flask(__name__)
    app.config["SSE_RUN_AUTH_TOKENS"] = [TOKEN]
    sse = SSERun(app)
    assert "403" not in document(app)["paths"]["/channels/{channel}"]["get"]["responses"]

    @sse.channel_auth
    def may_read(channel: str, subject: str | None) -> bool:
        return channel != "secret"

    doc = document(app)
    assert_valid(doc)
    for path in ("/channels", "/channels/{channel}"):
        operation = doc["paths"][path]["get"]
        assert sorted(operation["responses"]) == ["200", "400", "401", "403", "406", "503"]
        assert "security" not in operation  # the document's: a token is needed
    client = app.test_client()
    no_token = client.get("/channels/news")
    assert no_token.status_code == 401
    assert_documented(doc, "/channels/{channel}", "get", no_token)
    refused = client.get(
        "/channels?channel=news&channel=secret", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert refused.status_code == 403
    assert_documented(doc, "/channels", "get", refused)


def test_real_channel_streams_and_refusals_match_the_document() -> None:
    from tests.channel_followers import follow_client, taken

    app = create_app(SSE_RUN_CHANNEL_HISTORY=2)
    doc = document(app)
    client = app.test_client()
    sse = app.extensions["sse_run"].extension
    one, several = "/channels/{channel}", "/channels"
    event_schema = response_schema(doc, one, 200, "text/event-stream", "get")
    position = parameters(doc["paths"][one]["get"], "header")["Last-Event-ID"]["schema"]
    with app.app_context():
        for seq in range(1, 5):  # news keeps 3 and 4
            sse.publish("news", f"n{seq}")

    stream = client.get("/channels/news", buffered=False)
    assert_documented(doc, one, "get", stream)
    assert next(stream.response) == b"id: news:4\n\n"  # where the client stands
    stream.close()
    live = follow_client(client, "/channels?channel=news&channel=user:42", 2)
    # One after the other: two channels' events published at once may come in either order.
    with app.app_context():
        sse.publish("news", {"n": 5}, event="update")
    events = taken(live, 1)
    with app.app_context():
        sse.publish("user:42", "yours")
    events += taken(live, 1)
    assert [(e.id, e.event, e.data) for e in events] == [
        ("news:5,user:42:0", "update", '{"n":5}'),
        ("news:5,user:42:1", "message", "yours"),
    ]
    # Resumed from before the history: missed, then the events held.
    resumed = taken(follow_client(client, "/channels/news?last_event_id=news:1", 3), 3)
    assert [(e.id, e.event, e.data) for e in resumed] == [
        ("news:3", "missed", '{"channel":"news","missed":2}'),
        ("news:4", "message", "n4"),
        ("news:5", "update", '{"n":5}'),
    ]
    for event in [*events, *resumed]:
        fields = {"data": event.data, "event": event.event, "id": event.id}
        assert matches(doc, event_schema, fields) and matches(doc, position, event.id), event

    refusals = [
        (one, "/channels/bad%20name", {}, 400),
        (one, "/channels/news?channel=other", {}, 400),
        (one, "/channels/news", {"Last-Event-ID": "12"}, 400),
        (one, "/channels/news", {"Accept": "application/json"}, 406),
        (one, "/channels/news", {"Accept": "text/html"}, 406),
        (several, "/channels", {}, 400),
        (several, "/channels?channel=a&channel=a", {}, 400),
        (several, "/channels?" + "&".join(f"channel=c{i}" for i in range(33)), {}, 400),
    ]
    for path, url, headers, status in refusals:
        response = client.get(url, headers=headers)
        assert response.status_code == status, (url, response.get_json())
        assert_documented(doc, path, "get", response)
    # Any other method: the document's shared 405, with the Allow the channel URLs answer.
    wrong = client.put("/channels/news")
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "GET, OPTIONS"
    spec = doc["components"]["responses"]["405"]
    assert matches(doc, spec["content"]["application/json"]["schema"], wrong.get_json())
    assert client.options("/channels/news").status_code == 204


def test_a_store_that_does_not_answer_is_the_documented_503() -> None:
    from tests.live import free_port

    app = create_app(SSE_RUN_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        doc = document(app)
        response = app.test_client().get("/channels/news")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert_documented(doc, "/channels/{channel}", "get", response)
    finally:
        app.extensions["sse_run"].runs.store.close()
