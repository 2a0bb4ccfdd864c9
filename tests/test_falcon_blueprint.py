"""The example app's Falcon endpoints through Flask's test client (no gevent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

from example_app import create_app
from flask_sse_run.testing import parse_events
from tests.tiny_falcon import save_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_falcon_env(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("FALCON_MODEL", "FALCON_MAX_QUEUE", "FALCON_CONCURRENCY", "FALCON_MAX_BATCH", "FALCON_BATCHING")
    for name in names:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("falcon"))


def wait_ready(client: FlaskClient, timeout: float = 60, prefix: str = "/falcon") -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"{prefix}/health").get_json()
        if body["status"] != "loading" or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ready_app(model_dir: Path) -> Flask:
    # One row, no queue: a second request is refused while one runs (the 503 test).
    app = create_app(
        {"TESTING": True, "FALCON_MODEL": str(model_dir), "FALCON_MAX_BATCH": "1", "FALCON_MAX_QUEUE": "0"}
    )
    assert wait_ready(app.test_client())["status"] == "ready"
    return app


@pytest.fixture
def client(ready_app: Flask) -> Iterator[FlaskClient]:
    with ready_app.test_client() as client:
        yield client


def events(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(event.data) for event in parse_events(data)]


def test_without_falcon_model_the_endpoints_say_how_to_enable_them_and_the_app_works() -> None:
    client = create_app({"TESTING": True}).test_client()
    response = client.post("/falcon/run", json={"prompt": "Tell me a story"})
    assert response.status_code == 503
    assert "set FALCON_MODEL" in response.get_json()["error"]
    # How to install the extra, as an installed package and from a checkout.
    assert "pip install 'flask-sse-run[llm]'" in response.get_json()["error"]
    assert "pip install -e '.[llm]'" in response.get_json()["error"]
    health = client.get("/falcon/health")
    assert health.status_code == 503 and health.get_json()["status"] == "disabled"
    assert "FALCON_MODEL" in health.get_json()["message"]
    assert client.get("/health").get_json() == {"status": "ok"}


def test_while_the_model_loads_the_endpoints_answer_503_with_retry_after(model_dir: Path) -> None:
    app = create_app({"TESTING": True, "FALCON_MODEL": str(model_dir)})
    service = app.extensions["falcon"]
    release = threading.Event()
    real_loader = service._loader
    service._loader = lambda source, log: (release.wait(30), real_loader(source, log))[1]
    client = app.test_client()
    try:
        assert client.get("/falcon/health").get_json()["status"] == "loading"
        response = client.post("/falcon/run", json={"prompt": "Tell me a story"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert "still loading" in response.get_json()["error"]
        assert client.get("/health").status_code == 200
    finally:
        release.set()
    assert wait_ready(client)["status"] == "ready"


def test_a_model_that_cannot_load_is_reported_with_the_reason(tmp_path: Path) -> None:
    client = create_app({"TESTING": True, "FALCON_MODEL": str(tmp_path / "missing")}).test_client()
    health = wait_ready(client)
    assert health["status"] == "failed" and "missing" in health["error"]
    response = client.post("/falcon/run", json={"prompt": "Tell me a story"})
    assert response.status_code == 503 and "failed to load" in response.get_json()["error"]


def test_run_streams_text_pieces_then_a_summary(client: FlaskClient) -> None:
    response = client.post(
        "/falcon/run", json={"prompt": "Tell me a story", "max_new_tokens": 8, "min_new_tokens": 8}
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    items = events(response.data)
    pieces, final = items[:-1], items[-1]
    assert [piece["index"] for piece in pieces] == list(range(len(pieces)))
    assert all(set(piece) == {"text", "index"} for piece in pieces)
    assert set(final) == {
        "finish_reason", "generated_tokens", "prompt_tokens", "time_to_first_token_ms", "tokens_per_s",
    }  # fmt: skip
    assert final["prompt_tokens"] == 4  # "Tell me a story": one token a word
    assert final["finish_reason"] == "length" and final["generated_tokens"] == 8
    assert not "".join(piece["text"] for piece in pieces).startswith(" Tell me a story")  # no echo


def test_a_json_client_gets_every_event_in_one_document(client: FlaskClient) -> None:
    response = client.post(
        "/falcon/run",
        json={"prompt": "Tell me a story", "max_new_tokens": 3, "min_new_tokens": 3, "temperature": 0},
        headers={"Accept": "application/json"},
    )
    assert response.get_json()["result"][-1]["generated_tokens"] == 3


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": 2049}, "max_new_tokens"),
        ({"prompt": "a", "temperature": 2.5}, "temperature"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.01}, "top_p"),
        ({"prompt": "a", "top_k": -1}, "top_k"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "unknown": 1}, "unknown"),
    ],
)
def test_bad_parameters_get_422_naming_the_parameter(
    client: FlaskClient, body: dict[str, Any], loc: str
) -> None:
    response = client.post("/falcon/run", json=body)
    assert response.status_code == 422
    assert response.get_json()["detail"][0]["loc"][0] == loc


def test_a_prompt_too_long_for_the_context_gets_422(client: FlaskClient) -> None:
    response = client.post("/falcon/run", json={"prompt": "story " * 4096})
    assert response.status_code == 422
    assert response.get_json()["detail"][0]["loc"] == ["prompt"]
    response = client.post("/falcon/run", json={"prompt": "story " * 3000, "max_new_tokens": 2000})
    assert response.status_code == 422
    assert response.get_json()["detail"][0]["loc"] == ["max_new_tokens"]


def test_beyond_the_queue_requests_get_503_with_retry_after(ready_app: Flask) -> None:
    client = ready_app.test_client()  # no preserved contexts: two responses overlap here
    body = {"prompt": "Tell me a story", "max_new_tokens": 2000, "min_new_tokens": 2000}
    first = client.post("/falcon/run", json=body, buffered=False)  # running, not read to the end
    try:
        refused = client.post("/falcon/run", json=body)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "busy" in refused.get_json()["error"]
    finally:
        first.close()
    # A resumable run goes on without its client (for a reconnect); DELETE ends it, and its
    # place is given back once its row has left the batch.
    assert client.delete(f"/falcon/runs/{first.headers['X-Run-ID']}").status_code == 204
    deadline = time.monotonic() + 10
    while client.get("/falcon/health").get_json()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    again = client.post("/falcon/run", json={**body, "max_new_tokens": 5, "min_new_tokens": 5})
    assert again.status_code == 200 and again.data  # read to its end: the run has ended


def test_health_reports_the_model_and_its_generations(client: FlaskClient) -> None:
    assert client.post("/falcon/run", json={"prompt": "Tell me a story", "max_new_tokens": 2}).data
    health = client.get("/falcon/health")
    body = health.get_json()
    assert health.status_code == 200 and body["status"] == "ready"
    assert body["device"] == "cpu" and body["dtype"] == "float32" and body["running"] == 0
    assert body["tokens_generated"] > 0 and body["last_generation"]["finish_reason"] in {"length", "eos"}


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "transformers"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
import json, os, time
from example_app import create_app
client = create_app().test_client()
assert client.post("/run", json={"upper_range": 1}).status_code == 200
health = client.get("/falcon/health").get_json()
while health["status"] == "loading":
    time.sleep(0.05)
    health = client.get("/falcon/health").get_json()
print(json.dumps({"health": health, "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("falcon_model", ["", "tiiuae/falcon-7b-instruct"])
def test_the_example_app_starts_without_torch_installed(falcon_model: str) -> None:
    env = {**os.environ, "FALCON_MODEL": falcon_model, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["torch"] is False
    if falcon_model:
        assert out["health"]["status"] == "failed" and "llm extra" in out["health"]["error"]
    else:
        assert out["health"]["status"] == "disabled"


def test_the_core_and_the_example_app_do_not_import_torch() -> None:
    code = "import sys, flask_sse_run, flask_sse_run.llm, example_app; example_app.create_app(); "
    code += "print('torch' in sys.modules)"
    env = {**os.environ, "FALCON_MODEL": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_an_app_of_ones_own_mounts_everything_with_register_blueprint(model_dir: Path) -> None:
    from flask import url_for

    from flask_sse_run.llm import falcon_blueprint

    app = Flask("own")
    app.config.update(TESTING=True, FALCON_MODEL=str(model_dir))
    app.register_blueprint(falcon_blueprint)  # nothing else: the service comes with it
    client = app.test_client()
    assert wait_ready(client)["status"] == "ready"
    body = {"prompt": "Tell me a story", "max_new_tokens": 3, "min_new_tokens": 3}
    assert events(client.post("/falcon/run", json=body).data)[-1]["generated_tokens"] == 3
    with app.test_request_context():
        assert url_for("falcon.sse_run_call", name="run") == "/falcon/run"
        assert url_for("falcon.health") == "/falcon/health"
    doc = client.get("/falcon/openapi.json").get_json()
    assert doc["paths"]["/falcon/run"]["post"]["operationId"] == "falcon_run"
    assert "falcon_run_parameters" in doc["components"]["schemas"]
    # The OpenAI routes come with it.
    assert client.get("/falcon/v1/models").get_json()["data"][0]["id"] == str(model_dir)
    chat = {"model": str(model_dir), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    answer = client.post("/falcon/v1/chat/completions", json=chat).get_json()
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] <= 3
    with app.test_request_context():
        assert url_for("falcon.openai_chat_completions") == "/falcon/v1/chat/completions"


def test_the_blueprint_mounts_under_another_prefix_with_one_service_per_app(model_dir: Path) -> None:
    from flask_sse_run.llm import falcon_blueprint

    app = Flask("elsewhere")
    app.config.update(TESTING=True, FALCON_MODEL=str(model_dir))
    app.register_blueprint(falcon_blueprint, url_prefix="/llm")
    app.register_blueprint(falcon_blueprint, url_prefix="/llm2", name="falcon2")
    service = app.extensions["falcon"]
    client = app.test_client()
    assert wait_ready(client, prefix="/llm")["status"] == "ready"
    assert client.get("/falcon/health").status_code == 404
    body = {"prompt": "Tell me a story", "max_new_tokens": 2, "min_new_tokens": 2}
    for prefix in ("/llm", "/llm2"):
        assert client.get(f"{prefix}/health").get_json()["status"] == "ready"
        assert events(client.post(f"{prefix}/run", json=body).data)[-1]["generated_tokens"] == 2
        assert client.get(f"{prefix}/v1/models").status_code == 200
    assert app.extensions["falcon"] is service and service.finished["length"] == 2
