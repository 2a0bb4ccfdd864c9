"""Relaying a real engine: ``transformers serve`` with a tiny random Falcon on the CPU.

The Falcon blueprint with ``FALCON_UPSTREAM`` (through Flask's test client, and under real
gunicorn with the gevent worker), and the generic relay, against the engine's
``/v1/completions`` stream. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("fastapi")  # transformers[serving]
pytest.importorskip("torch")

from example_app import create_app
from flask_sse_run.testing import ServerSentEvent, SSEParser, parse_events
from tests.live import ROOT, Server, free_port, gunicorn
from tests.sse_clients import timed_events
from tests.upstreams import Upstream, save_engine_model, transformers_serve, wait_answering, wait_idle

PROMPT = "Tell me a story"
NO_GZIP = {"Accept-Encoding": "identity"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_engine_model(tmp_path_factory.mktemp("engine-model"))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Upstream]:
    with transformers_serve(model_dir, tmp_path_factory.mktemp("engine")) as upstream:
        yield upstream


def engine_text(engine: Upstream, body: dict[str, Any]) -> str:
    """What the engine itself streams for ``body`` (its own endpoint, no relay)."""
    response = requests.post(f"{engine.url}/v1/completions", json={**body, "stream": True}, timeout=60)
    chunks = [json.loads(e.data) for e in parse_events(response.content)]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def run(client: Any, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    response = client.post("/falcon/run", json=body)
    if response.mimetype != "text/event-stream":
        return response.status_code, [response.get_json()]
    return response.status_code, [json.loads(e.data) for e in parse_events(response.get_data())]


@pytest.fixture(scope="module")
def client(engine: Upstream) -> Any:
    return create_app({"TESTING": True, "FALCON_UPSTREAM": f"{engine.url}/v1"}).test_client()


# -- the blueprint through the test client ----------------------------------------------------


def test_the_blueprint_streams_the_engines_text_with_the_same_events(client: Any, engine: Upstream) -> None:
    status, events = run(client, {"prompt": PROMPT, "max_new_tokens": 20, "temperature": 0})
    assert status == 200
    pieces, summary = events[:-1], events[-1]
    assert [p["index"] for p in pieces] == list(range(len(pieces))) and all(p["text"] for p in pieces)
    text = "".join(p["text"] for p in pieces)
    assert text == engine_text(engine, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert summary["finish_reason"] == "length" and summary["generated_tokens"] == 20  # the engine's usage
    assert summary["time_to_first_token_ms"] > 0 and summary["tokens_per_s"] > 0


def test_the_seed_and_sampling_parameters_reach_the_engine(client: Any) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 30, "temperature": 1.0, "top_p": 0.95, "seed": 3}

    def text(**change: Any) -> str:
        return "".join(e.get("text", "") for e in run(client, {**body, **change})[1][:-1])

    first = text()
    assert text() == first
    assert text(seed=4) != first
    assert text(temperature=0) != first  # greedy


def test_stop_strings_end_the_text_before_them(client: Any) -> None:
    body: dict[str, Any] = {"prompt": PROMPT, "max_new_tokens": 40, "temperature": 1.0}
    for seed in range(11, 31):  # a sampled text long enough to hold a stop string in its middle
        body["seed"] = seed
        full = "".join(e.get("text", "") for e in run(client, body)[1][:-1])
        if len(full) >= 12:
            break
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    status, events = run(client, {**body, "stop": [stop]})
    assert status == 200
    assert "".join(e.get("text", "") for e in events[:-1]) == full[: full.find(stop)]
    assert events[-1]["finish_reason"] == "stop"


def test_parameters_the_engine_cannot_take_get_422_before_it_is_asked(client: Any) -> None:
    status, (body,) = run(
        client, {"prompt": PROMPT, "top_k": 5, "repetition_penalty": 1.3, "min_new_tokens": 2}
    )
    assert status == 422
    assert [d["loc"] for d in body["detail"]] == [["top_k"], ["repetition_penalty"], ["min_new_tokens"]]
    status, (body,) = run(client, {"prompt": PROMPT, "temperature": 5})  # the blueprint's own validation
    assert status == 422 and body["detail"][0]["loc"] == ["temperature"]


def test_the_engines_refusal_keeps_its_status_and_message(engine: Upstream, model_dir: Path) -> None:
    config = {"TESTING": True, "FALCON_UPSTREAM": f"{engine.url}/v1", "FALCON_UPSTREAM_MODEL": "other"}
    status, (body,) = run(create_app(config).test_client(), {"prompt": PROMPT})
    assert status == 400
    assert body == {
        "error": f"the upstream refused the request (HTTP 400): Server is pinned to '{model_dir}'; "
        "requested 'other'."
    }


def test_health_reports_the_engine(client: Any, model_dir: Path, engine: Upstream) -> None:
    response = client.get("/falcon/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ready" and body["upstream"] == f"{engine.url}/v1"
    assert body["model"] == str(model_dir) and body["models"] == [str(model_dir)]
    assert body["finished"]["length"] >= 1 and body["last_generation"]["generated_tokens"] >= 1


def test_an_unreachable_engine_is_reported_and_refused_with_503() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = create_app({"TESTING": True, "FALCON_UPSTREAM": url}).test_client()
    health = client.get("/falcon/health")
    assert health.status_code == 503
    assert health.get_json() == {
        "status": "failed",
        "upstream": url,
        "error": "the upstream is unreachable: ConnectionError",
    }
    status, (body,) = run(client, {"prompt": PROMPT})
    assert status == 503 and body == {"error": "the upstream is unreachable (ConnectionRefusedError)"}


def test_the_app_in_front_of_an_engine_imports_no_torch(engine: Upstream) -> None:
    script = (
        "import json, sys\n"
        "from example_app import create_app\n"
        f"client = create_app({{'FALCON_UPSTREAM': '{engine.url}/v1'}}).test_client()\n"
        "body = {'prompt': 'Tell me a story', 'max_new_tokens': 3, 'temperature': 0}\n"
        "response = client.post('/falcon/run', json=body)\n"
        "assert response.status_code == 200, response.get_data()\n"
        "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# How the relay maps an engine's refusals and failures is tested against an upstream the tests
# control (tests/test_relay_live.py): the real engine's error wording changes between releases.


# -- under gunicorn's gevent worker ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, engine: Upstream) -> Iterator[Server]:
    env = {"FALCON_UPSTREAM": f"{engine.url}/v1", "FALCON_MODEL": ""}
    with gunicorn("wsgi:app", tmp_path=tmp_path_factory.mktemp("front"), env=env) as srv:
        wait_answering(f"{srv.url}/falcon/health", srv.process, srv.log_path, 30)
        yield srv


def post(server: Server, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{server.url}/falcon/run", json=body, headers=NO_GZIP, stream=True, timeout=60)


def test_pieces_arrive_as_the_engine_makes_them(server: Server) -> None:
    started = time.monotonic()
    with post(server, {"prompt": PROMPT, "max_new_tokens": 100, "temperature": 0}) as response:
        events = timed_events(response)
    summary = json.loads(events[-1][1].data)
    assert summary["finish_reason"] == "length" and summary["generated_tokens"] == 100
    times = [t - started for t, _ in events[:-1]]
    # Streamed, not collected: the first piece comes early and the pieces spread over the run,
    # arriving in at least 3 of its 4 quarters (pieces held back and sent at the end would fill
    # the first and the last; a stall of a loaded machine empties at most one).
    assert times[0] < 0.25 * times[-1], (times[0], times[-1])
    span = times[-1] - times[0]
    quarters = {min(3, int(4 * (t - times[0]) / span)) for t in times}
    assert len(quarters) >= 3, times


def test_deleting_the_run_ends_the_engines_generation(server: Server, engine: Upstream) -> None:
    response = post(server, {"prompt": PROMPT, "max_new_tokens": 2048, "temperature": 0})
    assert len(timed_events(response, limit=20)) >= 20
    response.close()  # a resumable run: it goes on for a reconnect ...
    assert requests.get(f"{server.url}/falcon/health", timeout=10).json()["running"] == 1
    # ... until DELETE. 2048 tokens take the engine over 25 s; it stops computing at once instead.
    deleted = requests.delete(f"{server.url}/falcon/runs/{response.headers['X-Run-ID']}", timeout=10)
    assert deleted.status_code == 204
    assert wait_idle(engine, timeout=3) < 3
    health = requests.get(f"{server.url}/falcon/health", timeout=10).json()
    assert health["finished"].get("cancelled", 0) >= 1
    # The engine generates one request at a time: the next one runs at once, not after the
    # 2000-odd tokens left of the first (over 25 s at this model's best speed here).
    started = time.monotonic()
    with post(server, {"prompt": PROMPT, "max_new_tokens": 5, "temperature": 0}) as second:
        assert json.loads(timed_events(second)[-1][1].data)["generated_tokens"] == 5
    assert time.monotonic() - started < 4


def test_a_client_that_closes_an_openai_stream_ends_the_engines_generation(
    server: Server, engine: Upstream
) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{server.url}/falcon/v1", api_key="unused", max_retries=0, timeout=60)
    stream = sdk.completions.create(
        model="falcon", prompt=PROMPT, max_tokens=2048, temperature=0, stream=True
    )
    assert len([chunk for chunk, _ in zip(stream, range(20), strict=False)]) == 20
    stream.close()  # not a run: the relayed request is closed at once, and the engine aborts
    assert wait_idle(engine, timeout=3) < 3


def test_an_engine_killed_mid_stream_gives_one_error_event_and_a_clean_end(
    tmp_path: Path, model_dir: Path
) -> None:
    with transformers_serve(model_dir, tmp_path) as doomed:
        env = {"FALCON_UPSTREAM": f"{doomed.url}/v1", "FALCON_MODEL": ""}
        with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as front:
            wait_answering(f"{front.url}/falcon/health", front.process, front.log_path, 30)
            response = post(front, {"prompt": PROMPT, "max_new_tokens": 2048, "temperature": 0})
            parser = SSEParser()
            chunks = response.raw.stream(65536, decode_content=True)
            received: list[ServerSentEvent] = []
            for chunk in chunks:
                received.extend(parser.feed(chunk))
                if len(received) >= 10:
                    break
            doomed.kill()
            for chunk in chunks:  # to the body's proper end: no ChunkedEncodingError
                received.extend(parser.feed(chunk))
            health = requests.get(f"{front.url}/falcon/health", timeout=10)
    errors = [e for e in received if e.event == "error"]
    assert len(errors) == 1 and received[-1] is errors[0]
    assert all("text" in json.loads(e.data) for e in received[:-1])  # no summary: it did not finish
    error = json.loads(errors[0].data)
    assert error["type"] == "UpstreamError" and error["status"] == 502
    assert error["message"].startswith("the upstream connection broke mid-stream (")
    assert health.status_code == 503 and health.json()["status"] == "failed"


# -- the OpenAI routes in front of the engine ---------------------------------------------------


def test_the_openai_routes_relay_the_engine_to_the_sdk(server: Server, engine: Upstream) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=f"{server.url}/falcon/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in sdk.models.list()] == ["falcon"]  # FALCON_UPSTREAM_MODEL is not set
    completion = sdk.completions.create(model="falcon", prompt=PROMPT, max_tokens=20, temperature=0)
    expected = engine_text(engine, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 20
    assert completion.usage.prompt_tokens > 0  # the engine's count
    stream = sdk.chat.completions.create(
        model="falcon", messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens <= 10
    assert chunks[-2].choices[0].finish_reason in {"length", "stop"}


def test_an_engine_killed_mid_stream_is_one_error_chunk_that_the_sdk_raises(
    tmp_path: Path, model_dir: Path
) -> None:
    openai = pytest.importorskip("openai")
    with transformers_serve(model_dir, tmp_path) as doomed:
        env = {"FALCON_UPSTREAM": f"{doomed.url}/v1", "FALCON_MODEL": ""}
        with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as front:
            wait_answering(f"{front.url}/falcon/health", front.process, front.log_path, 30)
            sdk = openai.OpenAI(
                base_url=f"{front.url}/falcon/v1", api_key="unused", max_retries=0, timeout=60
            )
            stream = sdk.completions.create(
                model="falcon", prompt=PROMPT, max_tokens=2048, temperature=0, stream=True
            )
            received = []
            with pytest.raises(openai.APIError) as failed:
                for chunk in stream:
                    received.append(chunk)
                    if len(received) == 10:
                        doomed.kill()
    assert len(received) >= 10 and all(c.choices[0].finish_reason is None for c in received)
    assert failed.value.message.startswith("the upstream connection broke mid-stream (")
    assert failed.value.body["type"] == "server_error"  # type: ignore[index]
