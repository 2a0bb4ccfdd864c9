"""The Postman collection in postman/: checked against the example app's openapi.json, then run
by newman (Postman's command-line runner, installed from npm into postman/node_modules) against
the example app under real gunicorn.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from openapi_schema_validator import OAS31Validator

from example_app import create_app
from tests.channel_followers import follow_url, taken
from tests.live import ROOT, Server, gunicorn

POSTMAN = ROOT / "postman"
COLLECTION = POSTMAN / "flask-sse-run.postman_collection.json"
NEWMAN = POSTMAN / "node_modules" / ".bin" / "newman"
TOKEN = "postman-token-0123456789"
_STATUS = re.compile(r"to\.have\.status\((\d{3})\)")
_ALLOW = re.compile(r'get\("Allow"\)\)\.to\.eql\("([^"]*)"\)')
# Headers every operation takes without documenting them as parameters (OpenAPI ignores these).
_UNDOCUMENTED_HEADERS = {"accept", "content-type", "authorization"}


def items() -> list[dict[str, Any]]:
    collection: dict[str, Any] = json.loads(COLLECTION.read_text())
    return list(collection["item"])


def item_path(item: dict[str, Any]) -> str:
    return "/" + "/".join(item["request"]["url"]["path"])


def item_query(item: dict[str, Any]) -> list[tuple[str, str]]:
    """The query's ``(key, value)`` pairs, in order (a key may repeat: ``?channel=a&channel=b``)."""
    return [(q["key"], q["value"]) for q in item["request"]["url"].get("query", [])]


def documented_path(path: str, openapi: dict[str, Any]) -> str | None:
    """The path template of ``openapi`` that ``path`` is an instance of (``/runs/{run_id}``)."""
    segments = path.split("/")
    for template in openapi["paths"]:
        parts = template.split("/")
        if len(parts) == len(segments) and all(
            part == segment or (part.startswith("{") and part.endswith("}") and segment)
            for part, segment in zip(parts, segments, strict=True)
        ):
            return template
    return None


def script(item: dict[str, Any]) -> str:
    return "\n".join(line for event in item["event"] for line in event["script"]["exec"])


def expected_statuses(item: dict[str, Any]) -> set[str]:
    return set(_STATUS.findall(script(item)))


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
    query = "&".join(f"{key}={value}" for key, value in item_query(item))
    assert item["request"]["url"]["raw"] == "{{baseUrl}}" + path + (f"?{query}" if query else "")
    if path == "/openapi.json":
        assert method == "get" and statuses == {"200"}
        return
    template = documented_path(path, openapi)
    if template is None:
        assert statuses == {"404"}
        return
    if method not in openapi["paths"][template]:
        assert statuses == {"405"}
        # The Allow the request expects is what the document says the URL serves.
        allowed = {m.upper() for m in openapi["paths"][template]} | {"OPTIONS"}
        assert _ALLOW.findall(script(item)) == [", ".join(sorted(allowed))]
        return
    operation = openapi["paths"][template][method]
    assert statuses <= set(operation["responses"])
    documented = {p["name"].lower(): p for p in operation.get("parameters", [])}
    sent = {h["key"].lower() for h in item["request"]["header"]}
    assert sent - _UNDOCUMENTED_HEADERS <= {n for n, p in documented.items() if p["in"] == "header"}
    queried = {key for key, _ in item_query(item)}
    assert queried <= {n for n, p in documented.items() if p["in"] == "query"}
    if statuses & {"200", "202"} and "last-event-id" not in sent:
        # A call that starts the function sends what it requires (a reconnect sends nothing).
        required = {n for n, p in documented.items() if p["in"] == "query" and p["required"]}
        assert required <= queried
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
    def operation(item: dict[str, Any]) -> tuple[str | None, str]:
        return documented_path(item_path(item), openapi), item["request"]["method"].lower()

    succeeding = {operation(i) for i in items() if any(s.startswith("2") for s in expected_statuses(i))}
    called = {operation(i) for i in items()}
    documented = {(path, method) for path, operations in openapi["paths"].items() for method in operations}
    assert documented <= called
    # The example app starts without a model, so its Falcon endpoint can only answer 503, and no
    # Falcon run exists to follow or cancel (404).
    falcon = {("/falcon/run", "post"), ("/falcon/run", "get")}
    falcon |= {("/falcon/runs/{run_id}", "get"), ("/falcon/runs/{run_id}", "delete")}
    # A channel's stream never ends, and newman reads every answer to its end: the collection
    # publishes (POST /notify) and asks the channel URLs for their refusals; the newman test
    # below follows the channel and gets the collection's publish.
    channels = {(path, "get") for path in openapi["paths"] if re.search(r"/channels(/\{channel\})?$", path)}
    assert len(channels) == 4  # /channels and /channels/{channel}, at / and under /falcon
    assert channels <= called
    assert documented - falcon - channels <= succeeding
    assert any(item_path(i) == "/openapi.json" and expected_statuses(i) == {"200"} for i in items())


def test_the_collection_uses_variables_for_the_server_and_the_token() -> None:
    collection = json.loads(COLLECTION.read_text())
    assert {v["key"] for v in collection["variable"]} == {"baseUrl", "token", "runId"}
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


def falcon_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (health := requests.get(f"{server.url}/falcon/health", timeout=10)).status_code != 200:
        assert health.json()["status"] == "loading", health.text
        assert time.monotonic() < deadline, "the model did not load in time"
        time.sleep(0.2)


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("auth", "falcon"),
    [(True, False), (False, False), (False, True)],
    ids=["auth-on", "auth-off", "falcon-on"],
)
def test_newman_runs_the_collection_against_live_gunicorn(
    newman: Path, tmp_path: Path, auth: bool, falcon: bool
) -> None:
    env = {"EXAMPLE_SSE_RUN_AUTH_TOKENS": json.dumps([TOKEN])} if auth else {}
    if falcon:
        pytest.importorskip("torch")
        from tests.tiny_falcon import save_model

        env |= {"FALCON_MODEL": str(save_model(tmp_path / "falcon")), "HF_HUB_OFFLINE": "1"}
    report = tmp_path / "newman.json"
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as server:
        if falcon:
            falcon_ready(server, 120)
        # A client of the channel the collection publishes on, for as long as newman runs.
        token = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
        notified = follow_url(f"{server.url}/channels/notifications", 1, **token)
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
        # The collection's publish reached the channel's client, with the id it answered.
        (event,) = taken(notified, 1)
    stats = json.loads(report.read_text())["run"]
    assert stats["failures"] == []
    assert stats["stats"]["requests"] == {"total": len(items()), "pending": 0, "failed": 0}
    assert stats["stats"]["assertions"]["failed"] == 0
    assert stats["stats"]["assertions"]["total"] >= 3 * len(items()) - 6
    codes = {e["item"]["name"]: e["response"]["code"] for e in stats["executions"]}
    assert codes["Stream /run as Server-Sent Events"] == 200
    assert codes["Stream /run with GET, as EventSource does"] == 200
    assert codes["Start a run without waiting: Prefer respond-async, 202"] == 202
    assert codes["Follow the run: GET /runs/{{runId}}"] == 200
    assert codes["Reconnect with Last-Event-ID: the events after it"] == 200
    assert codes["Reconnect after the last event: 204"] == 204
    assert codes["Cancel the run: DELETE /runs/{{runId}}, 204"] == 204
    assert codes["Unknown run: 404"] == 404
    # The same requests, and the same script, whether or not the server has a model.
    assert codes["Falcon: a generation streamed, 503 until a model is configured"] == (200 if falcon else 503)
    assert codes["Falcon with GET, as the page's EventSource does: 503 until a model is configured"] == (
        200 if falcon else 503
    )
    assert codes["Unknown Falcon run: DELETE /falcon/runs/..., 404"] == 404
    assert codes["No bearer token: 401 when auth is on"] == (401 if auth else 200)
    assert codes["Publish on the notifications channel: POST /notify"] == 200
    assert codes["Follow a channel as JSON: 406, a channel is only a stream"] == 406
    assert codes["Wrong method on a channel: 405"] == 405
    assert codes["No bearer token on a channel: 401 when auth is on"] == (401 if auth else 406)
    published = next(e for e in stats["executions"] if e["item"]["name"].startswith("Publish on the"))
    answered = json.loads(bytes(published["response"]["stream"]["data"]))
    assert answered["result"] == event.id == "notifications:1"
    assert event.data == "hello from Postman"


def documented_newman_command() -> str:
    """The command docs/openapi.md gives for running the collection with newman."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "docs" / "openapi.md").read_text(), re.S | re.M)
    commands = [block for block in blocks if COLLECTION.name in block]
    assert len(commands) == 1
    return str(commands[0])


@pytest.mark.timeout(420)
def test_the_documented_newman_command_runs_from_a_read_only_checkout(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("npm") is None:
        pytest.skip("needs unshare (util-linux) for a read-only mount, and npm")
    # What the command reads of a checkout, without the node_modules a test may have installed.
    checkout = tmp_path / "checkout"
    (checkout / "postman").mkdir(parents=True)
    for name in ("package.json", "package-lock.json", COLLECTION.name):
        shutil.copy(POSTMAN / name, checkout / "postman" / name)
    (tmp_path / "tmp").mkdir()
    # In a mount namespace of its own, the checkout is mounted read-only over itself: nothing
    # the command does can write there, as for a user's read-only checkout.
    namespace = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        namespace.append("--map-root-user")
    read_only = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1"'
    probe = subprocess.run(
        [*namespace, "sh", "-c", f'{read_only} && ! touch "$1/postman/probe" 2>/dev/null', "sh", checkout],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount the checkout read-only here: {probe.stderr.strip()}")
    with gunicorn("wsgi:app", tmp_path=tmp_path) as server:
        command = documented_newman_command().replace("http://127.0.0.1:8000", server.url)
        run = subprocess.run(
            [*namespace, "sh", "-c", f'{read_only} && cd "$1" && exec bash -c "$2"', "sh", checkout, command],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert f"{len(items())} " in run.stdout  # newman's summary: every request ran
    assert sorted(path.name for path in (checkout / "postman").iterdir()) == sorted(
        ["package.json", "package-lock.json", COLLECTION.name]
    )
