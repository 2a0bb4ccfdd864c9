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


def response_schema(doc: dict[str, Any], path: str, status: int, media: str = "application/json") -> Any:
    schema: dict[str, Any] = doc["paths"][path]["post"]["responses"][str(status)]["content"][media]["schema"]
    return schema


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
    assert list(doc["paths"]) == ["/api/v1/nested"]


def test_each_function_is_a_post_operation_whose_body_is_its_signature() -> None:
    doc = document(create_app())
    assert sorted(doc["paths"]) == [
        "/bad_close", "/big", "/blocking_ticks", "/burst_then_wait", "/busy_after_first", "/count",
        "/endless", "/events", "/fail_after", "/firehose", "/plain", "/plain_sleeper",
        "/resumable_fail", "/resumable_ticks", "/run", "/sleeper", "/ticks", "/watcher", "/whoami",
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
    assert all("401" not in path["post"]["responses"] for path in doc["paths"].values())


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
    assert document(app)["paths"] == {}

    @sse.function
    def late() -> Iterator[str]:
        yield "late"

    assert list(document(app)["paths"]) == ["/late"]


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
