"""The Falcon blueprint's OpenAI routes through Flask's test client (no gevent), with tiny random
Falcons loaded through from_pretrained: shapes, the stream flag, chat templates, refusals."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

from example_app import create_app
from flask_sse_run.llm.openai_api import fallback_chat_prompt
from flask_sse_run.testing import parse_events
from tests.tiny_falcon import save_model

PROMPT = "Tell me a story"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TOKEN = "openai-routes-token-0123456789"


@pytest.fixture(autouse=True)
def no_falcon_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FALCON_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("falcon"))


@pytest.fixture(scope="module")
def templated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of model, whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    directory = save_model(tmp_path_factory.mktemp("templated"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def ready(config: dict[str, Any]) -> Flask:
    app = create_app({"TESTING": True, **config})
    client = app.test_client()
    deadline = time.monotonic() + 60
    while client.get("/falcon/health").get_json()["status"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return app


@pytest.fixture(scope="module")
def app(model_dir: Path) -> Flask:
    return ready({"FALCON_MODEL": str(model_dir)})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def model(client: FlaskClient) -> str:
    name: str = client.get("/falcon/v1/models").get_json()["data"][0]["id"]
    return name


def chat(client: FlaskClient, content: str = PROMPT, **body: Any) -> Any:
    messages = [{"role": "user", "content": content}]
    return client.post(
        "/falcon/v1/chat/completions", json={"model": model(client), "messages": messages, **body}
    )


def complete(client: FlaskClient, prompt: str = PROMPT, **body: Any) -> Any:
    return client.post("/falcon/v1/completions", json={"model": model(client), "prompt": prompt, **body})


def chunks(response: Any) -> list[Any]:
    """The stream's data, each parsed as JSON but the last (``[DONE]``)."""
    data = [event.data for event in parse_events(response.get_data())]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def test_models_lists_the_one_model_named_after_falcon_model(client: FlaskClient, model_dir: Path) -> None:
    response = client.get("/falcon/v1/models")
    assert response.status_code == 200 and response.mimetype == "application/json"
    (entry,) = response.get_json()["data"]
    assert (
        entry["id"] == str(model_dir) and entry["object"] == "model" and entry["owned_by"] == "flask-sse-run"
    )


def test_stream_false_answers_one_document_even_to_a_client_that_accepts_only_event_streams(
    client: FlaskClient,
) -> None:
    response = client.post(
        "/falcon/v1/completions",
        json={"model": model(client), "prompt": PROMPT, "max_tokens": 6, "min_tokens": 6},
        headers={"Accept": "text/event-stream"},
    )
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.get_json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and choice["text"] and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_stream_true_streams_chunks_even_to_a_client_that_accepts_only_json(client: FlaskClient) -> None:
    # What the official SDK sends when it streams: Accept: application/json.
    response = client.post(
        "/falcon/v1/chat/completions",
        json={
            "model": model(client),
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 5,
            "min_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    # Nothing but data lines and the blank lines that end them: no id, event or retry field.
    lines = response.get_data(as_text=True).split("\n")
    assert all(line.startswith("data: ") or line == "" for line in lines)
    items = chunks(response)
    assert items[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = items[1:-2]
    # Five tokens, in as many text chunks or fewer: a sampled <unk> has no text of its own
    # (five of them, rarely, make none).
    assert len(pieces) <= 5 and all(set(p["choices"][0]["delta"]) == {"content"} for p in pieces)
    assert items[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert items[-1]["choices"] == [] and items[-1]["usage"]["completion_tokens"] == 5
    assert all(item["usage"] is None for item in items[:-1])
    assert len({item["id"] for item in items}) == 1 and items[0]["object"] == "chat.completion.chunk"


def text_of(response: Any) -> str:
    if response.mimetype == "text/event-stream":
        return "".join(c["choices"][0].get("text", "") for c in chunks(response) if c["choices"])
    choice = response.get_json()["choices"][0]
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


def test_chat_without_a_template_is_a_completion_of_the_plain_fallback_prompt(client: FlaskClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    body = {"max_tokens": 30, "temperature": 0}
    answer = client.post(
        "/falcon/v1/chat/completions", json={"model": model(client), "messages": messages, **body}
    )
    prompt = fallback_chat_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
    assert prompt == "System: Be brief.\nUser: Tell me a story\nAssistant:"
    same = complete(client, prompt, stop="\nUser:", **body)
    assert answer.status_code == same.status_code == 200
    assert answer.get_json()["choices"][0]["message"]["content"] == text_of(same)
    assert answer.get_json()["usage"] == same.get_json()["usage"]


def test_chat_with_the_tokenizers_template_is_a_completion_of_what_it_renders(templated_dir: Path) -> None:
    client = ready({"FALCON_MODEL": str(templated_dir)}).test_client()
    body = {"max_tokens": 12, "min_tokens": 12, "temperature": 0}
    answer = chat(client, **body)
    same = complete(client, f"<user> {PROMPT}\n<assistant>", **body)
    assert answer.get_json()["choices"][0]["message"]["content"] == text_of(same)
    assert answer.get_json()["usage"] == same.get_json()["usage"]


def test_chat_without_max_tokens_may_use_the_rest_of_the_context(tmp_path: Path) -> None:
    client = ready({"FALCON_MODEL": str(save_model(tmp_path / "small", context=40))}).test_client()
    usage = chat(client, min_tokens=1000).get_json()["usage"]  # no EOS before the context is full
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 40


def test_the_same_seed_gives_the_same_text_and_a_stop_string_ends_it(client: FlaskClient) -> None:
    body = {"max_tokens": 30, "min_tokens": 30, "temperature": 1.2, "seed": 11}
    first = text_of(complete(client, **body))
    assert (
        text_of(complete(client, **body)) == first
        and text_of(complete(client, **{**body, "seed": 12})) != first
    )
    words = first.split()
    stop = f"{words[3]} {words[4]}"
    stopped = complete(client, **{**body, "stop": stop}).get_json()
    assert stopped["choices"][0]["text"] == first[: first.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # vLLM's top_k reaches the sampler: one token left is greedy decoding.
    assert text_of(complete(client, **{**body, "top_k": 1})) == text_of(
        complete(client, max_tokens=30, temperature=0)
    )


def error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_refusals_come_in_openais_shape_with_the_right_status(client: FlaskClient) -> None:
    assert error(chat(client, n=2), 400)["param"] == "n"
    wrong = client.post("/falcon/v1/completions", json={"model": "gpt-4o", "prompt": PROMPT})
    assert error(wrong, 404)["code"] == "model_not_found"
    # The message names the real route that lists the model, where this blueprint mounts it.
    hi = [{"role": "user", "content": "Hi"}]
    wrong_chat = client.post("/falcon/v1/chat/completions", json={"model": "gpt-4o", "messages": hi})
    assert "GET /falcon/v1/models names the one it serves" in error(wrong_chat, 404)["message"]
    too_long = error(chat(client, "story " * 5000), 400)
    assert (too_long["code"], too_long["param"]) == ("context_length_exceeded", "messages")
    over = error(complete(client, max_tokens=5000), 400)
    assert (over["code"], over["param"]) == ("context_length_exceeded", "max_tokens")
    not_json = client.post("/falcon/v1/completions", data="{", content_type="application/json")
    assert error(not_json, 400)["message"].startswith("body is not valid JSON")
    assert error(client.post("/falcon/v1/completions", data="x", content_type="text/plain"), 415)
    get = client.get("/falcon/v1/chat/completions")
    assert error(get, 405)["type"] == "invalid_request_error" and get.headers["Allow"] == "OPTIONS, POST"
    options = client.options("/falcon/v1/chat/completions")
    assert options.status_code == 204 and options.headers["Allow"] == "OPTIONS, POST"
    assert error(client.post("/falcon/v1/models"), 405)


HUGE = 2**70  # its digits appear in no message of this server's own


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("completions", {"max_tokens": HUGE}),
        ("chat", {"max_tokens": HUGE}),
        ("chat", {"max_completion_tokens": HUGE}),
        ("completions", {"max_tokens": 4321}),
        ("completions", {"seed": HUGE}),
        ("completions", {"temperature": 4321.5}),
    ],
)
def test_a_clients_values_are_never_echoed_in_errors(
    client: FlaskClient, route: str, body: dict[str, Any]
) -> None:
    response = chat(client, **body) if route == "chat" else complete(client, **body)
    refused = error(response, 400)
    ((name, value),) = body.items()
    assert refused["param"] == name and refused["message"].startswith(f"{name}: ")
    assert str(value) not in response.get_data(as_text=True)


def test_the_context_and_kv_budget_refusals_name_the_room_left_not_the_value(model_dir: Path) -> None:
    small = ready({"FALCON_MODEL": str(model_dir), "FALCON_MAX_BATCH_TOKENS": "100"}).test_client()
    refused = error(complete(small, max_tokens=2345), 400)
    assert refused["code"] == "context_length_exceeded" and "2345" not in refused["message"]
    assert refused["message"].startswith("max_tokens: must be at most 96 for this prompt (4 tokens)")
    blueprint = small.post("/falcon/run", json={"prompt": PROMPT, "max_new_tokens": 2047})
    assert blueprint.status_code == 422 and "2047" not in blueprint.get_data(as_text=True)
    assert blueprint.get_json()["detail"][0]["loc"] == ["max_new_tokens"]


#: A megabyte of prompt (under the 1 MiB body limit): a few tenths of a second of the tokenizer.
LONG_PROMPT = ("Tell me a story about the snow man " * 30_000)[:1_000_000]


def two_long_prompts_at_once(app: Flask) -> list[Any]:
    answers: list[Any] = []
    threads = [
        threading.Thread(target=lambda: answers.append(complete(app.test_client(), LONG_PROMPT)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_a_long_prompt_beyond_the_tokenizing_bound_and_its_queue_gets_503(model_dir: Path) -> None:
    app = ready({"FALCON_MODEL": str(model_dir), "FALCON_MAX_TOKENIZING": "1", "FALCON_MAX_QUEUE": "0"})
    answers = sorted(two_long_prompts_at_once(app), key=lambda answer: answer.status_code)
    assert [answer.status_code for answer in answers] == [400, 503]
    checked, refused = answers
    assert error(checked, 400)["code"] == "context_length_exceeded"
    assert "busy reading other long prompts" in error(refused, 503)["message"]
    assert refused.headers["Retry-After"] == "5"


def test_a_long_prompt_within_the_queue_waits_for_its_turn(model_dir: Path) -> None:
    app = ready({"FALCON_MODEL": str(model_dir), "FALCON_MAX_TOKENIZING": "1", "FALCON_MAX_QUEUE": "1"})
    for answer in two_long_prompts_at_once(app):
        assert error(answer, 400)["code"] == "context_length_exceeded"


def test_a_disabled_model_is_503_and_a_full_queue_503_with_retry_after(model_dir: Path) -> None:
    off = create_app({"TESTING": True}).test_client()
    disabled = error(off.post("/falcon/v1/completions", json={"model": "falcon", "prompt": PROMPT}), 503)
    assert disabled["type"] == "server_error" and "FALCON_MODEL" in disabled["message"]
    client = ready(
        {"FALCON_MODEL": str(model_dir), "FALCON_MAX_BATCH": "1", "FALCON_MAX_QUEUE": "0"}
    ).test_client()
    body = {"model": str(model_dir), "prompt": PROMPT, "max_tokens": 2000, "min_tokens": 2000, "stream": True}
    running = client.post("/falcon/v1/completions", json=body, buffered=False)
    try:
        busy = client.post("/falcon/v1/completions", json=body)
        assert "busy" in error(busy, 503)["message"] and busy.headers["Retry-After"] == "5"
    finally:
        running.close()  # not a resumable run: its place is given back at once
    assert complete(client, max_tokens=2).status_code == 200


def test_bearer_auth_guards_every_route_and_answers_in_openais_shape(model_dir: Path) -> None:
    client = ready({"FALCON_MODEL": str(model_dir), "SSE_RUN_AUTH_TOKENS": [TOKEN]}).test_client()
    for response in (
        client.get("/falcon/v1/models"),
        client.post("/falcon/v1/completions", json={"model": str(model_dir), "prompt": PROMPT}),
        client.post(
            "/falcon/v1/chat/completions", headers={"Authorization": "Bearer wrong-token-0123456789"}
        ),
    ):
        refused = error(response, 401)
        assert refused["code"] == "invalid_api_key" and response.headers["WWW-Authenticate"].startswith(
            "Bearer"
        )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/falcon/v1/models", headers=headers).status_code == 200
    body = {"model": str(model_dir), "prompt": PROMPT, "max_tokens": 2}
    assert client.post("/falcon/v1/completions", json=body, headers=headers).status_code == 200


def test_the_mount_point_and_the_model_name_are_configurable(model_dir: Path) -> None:
    config = {
        "FALCON_OPENAI_PREFIX": "/openai",
        "FALCON_OPENAI_MODEL": "falcon-7b",
        "SSE_RUN_END_EVENT": "done",
    }
    client = ready({"FALCON_MODEL": str(model_dir), **config}).test_client()
    assert client.get("/falcon/v1/models").status_code == 404
    assert client.get("/falcon/openai/models").get_json()["data"][0]["id"] == "falcon-7b"
    body = {"model": "falcon-7b", "prompt": PROMPT, "max_tokens": 2}
    assert client.post("/falcon/openai/completions", json=body).status_code == 200
    # The app's end event is not sent: OpenAI's streams end with [DONE], and nothing follows.
    streamed = client.post("/falcon/openai/completions", json={**body, "stream": True}).get_data()
    assert streamed.endswith(b"data: [DONE]\n\n") and b"event:" not in streamed
    with pytest.raises(ValueError, match="FALCON_OPENAI_PREFIX"):
        create_app({"FALCON_OPENAI_PREFIX": "openai/"})


def test_a_chat_template_that_refuses_the_messages_is_a_400_with_its_message(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    directory = save_model(tmp_path / "strict")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }}\n{% endfor %}"
    )
    tokenizer.save_pretrained(directory)
    client = ready({"FALCON_MODEL": str(directory)}).test_client()
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    refused = client.post("/falcon/v1/chat/completions", json={"model": str(directory), "messages": messages})
    message = error(refused, 400)["message"]
    assert message.startswith("messages: the model's chat template refused them") and "alternate" in message
    messages[1]["role"] = "assistant"
    assert (
        client.post(
            "/falcon/v1/chat/completions",
            json={"model": str(directory), "messages": messages, "max_tokens": 2},
        ).status_code
        == 200
    )
