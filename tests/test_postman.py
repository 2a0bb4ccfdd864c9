"""The Postman collection in postman/: checked against the example app's openapi.json, then run
by newman (Postman's command-line runner, installed from npm into postman/node_modules) against
the example app under real gunicorn.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from openapi_schema_validator import OAS31Validator

from example_app import create_app
from tests.live import ROOT, gunicorn

POSTMAN = ROOT / "postman"
COLLECTION = POSTMAN / "flask-sse-run.postman_collection.json"
NEWMAN = POSTMAN / "node_modules" / ".bin" / "newman"
TOKEN = "postman-token-0123456789"
_STATUS = re.compile(r"to\.have\.status\((\d{3})\)")


def items() -> list[dict[str, Any]]:
    collection: dict[str, Any] = json.loads(COLLECTION.read_text())
    return list(collection["item"])


def item_path(item: dict[str, Any]) -> str:
    return "/" + "/".join(item["request"]["url"]["path"])


def expected_statuses(item: dict[str, Any]) -> set[str]:
    script = "\n".join(line for event in item["event"] for line in event["script"]["exec"])
    return set(_STATUS.findall(script))


def header(item: dict[str, Any], name: str) -> str | None:
    return next((h["value"] for h in item["request"]["header"] if h["key"].lower() == name.lower()), None)


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    # Auth on, as in the newman run, so that the 401 responses are documented too.
    app = create_app({"SSE_RUN_AUTH_TOKENS": [TOKEN]})
    doc: dict[str, Any] = app.test_client().get("/openapi.json").get_json()
    return doc


@pytest.mark.parametrize("item", items(), ids=lambda item: item["name"])
def test_each_request_and_its_expected_status_match_the_openapi_document(
    item: dict[str, Any], openapi: dict[str, Any]
) -> None:
    path, method = item_path(item), item["request"]["method"].lower()
    statuses = expected_statuses(item)
    assert statuses, "every request asserts its status"
    assert item["request"]["url"]["raw"] == "{{baseUrl}}" + path
    if path == "/openapi.json":
        assert method == "get" and statuses == {"200"}
        return
    if path not in openapi["paths"]:
        assert statuses == {"404"}
        return
    if method not in openapi["paths"][path]:
        assert statuses == {"405"} and set(openapi["paths"][path]) == {"post"}
        return
    operation = openapi["paths"][path][method]
    assert statuses <= set(operation["responses"])
    if header(item, "Content-Type") != "application/json":
        return
    schema = {**operation["requestBody"]["content"]["application/json"]["schema"], **openapi}
    try:
        valid = OAS31Validator(schema).is_valid(json.loads(item["request"]["body"]["raw"]))
    except json.JSONDecodeError:
        valid = False
    # A request that expects success sends a body the document accepts, and one that expects
    # a rejection of its body sends one the document refuses.
    if statuses & {"400", "422"}:
        assert not valid
    else:
        assert valid


def test_the_collection_calls_every_documented_operation_successfully(openapi: dict[str, Any]) -> None:
    succeeding = {
        (item_path(i), i["request"]["method"].lower()) for i in items() if "200" in expected_statuses(i)
    }
    called = {(item_path(i), i["request"]["method"].lower()) for i in items()}
    documented = {(path, method) for path, operations in openapi["paths"].items() for method in operations}
    assert documented <= called
    # The example app starts without a model, so its Falcon endpoint can only answer 503.
    assert documented - {("/falcon/run", "post")} <= succeeding
    assert ("/openapi.json", "get") in succeeding


def test_the_collection_uses_variables_for_the_server_and_the_token() -> None:
    collection = json.loads(COLLECTION.read_text())
    assert {v["key"] for v in collection["variable"]} == {"baseUrl", "token"}
    assert collection["auth"] == {
        "type": "bearer",
        "bearer": [{"key": "token", "value": "{{token}}", "type": "string"}],
    }
    assert TOKEN not in COLLECTION.read_text()


@pytest.fixture(scope="session")
def newman() -> Path:
    """newman from postman/node_modules, installed with ``npm ci`` (pinned by package-lock.json)."""
    if not NEWMAN.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed, so newman (an npm package) cannot run the Postman collection")
        install = subprocess.run(
            [npm, "ci", "--prefix", str(POSTMAN), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
    return NEWMAN


@pytest.mark.timeout(420)
@pytest.mark.parametrize("auth", [True, False], ids=["auth-on", "auth-off"])
def test_newman_runs_the_collection_against_live_gunicorn(newman: Path, tmp_path: Path, auth: bool) -> None:
    env = {"EXAMPLE_SSE_RUN_AUTH_TOKENS": json.dumps([TOKEN])} if auth else {}
    report = tmp_path / "newman.json"
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as server:
        run = subprocess.run(
            [
                str(newman), "run", str(COLLECTION),
                "--env-var", f"baseUrl={server.url}",
                "--env-var", f"token={TOKEN if auth else ''}",
                "--reporters", "cli,json", "--reporter-json-export", str(report),
                "--timeout-request", "30000", "--color", "off", "--disable-unicode",
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    stats = json.loads(report.read_text())["run"]
    assert stats["failures"] == []
    assert stats["stats"]["requests"] == {"total": len(items()), "pending": 0, "failed": 0}
    assert stats["stats"]["assertions"]["failed"] == 0
    assert stats["stats"]["assertions"]["total"] >= 3 * len(items()) - 6
    codes = {e["item"]["name"]: e["response"]["code"] for e in stats["executions"]}
    assert codes["Stream /run as Server-Sent Events"] == 200
    assert codes["Falcon model not configured: 503"] == 503
    assert codes["No bearer token: 401 when auth is on"] == (401 if auth else 200)
