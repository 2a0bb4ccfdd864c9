"""The OpenAI routes under real gunicorn (gevent worker) and a tiny random Falcon, called by the
clients people use: the official ``openai`` SDK (sync and async) and LangChain's ``ChatOpenAI``."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("torch")
pytest.importorskip("openai")

import openai

from tests.live import Server, gunicorn
from tests.tiny_falcon import save_model

PROMPT = "Tell me a story"
NAME = "tiny-falcon"
TOKEN = "openai-live-token-0123456789"
NO_GZIP = {"Accept-Encoding": "identity"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("falcon"))


def health(server: Server) -> dict[str, Any]:
    return requests.get(f"{server.url}/falcon/health", timeout=5).json()  # type: ignore[no-any-return]


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 90
    while health(server)["status"] == "loading":
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert health(server)["status"] == "ready", server.log()


def wait_idle(server: Server, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (body := health(server))["running"] or body["waiting"]:
        assert time.monotonic() < deadline, "generations did not end"
        time.sleep(0.02)
    return body


def env(model_dir: Path, **more: str) -> dict[str, str]:
    return {"FALCON_MODEL": str(model_dir), "FALCON_OPENAI_MODEL": NAME, "HF_HUB_OFFLINE": "1", **more}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    """Batched decoding, bearer auth on (the SDK's api_key is the token)."""
    extra = env(model_dir, EXAMPLE_SSE_RUN_AUTH_TOKENS=json.dumps([TOKEN]))
    with gunicorn("wsgi:app", tmp_path=tmp_path_factory.mktemp("live"), env=extra) as srv:
        wait_ready(srv)
        yield srv


def client(server: Server, **kwargs: Any) -> Any:
    options = {"api_key": TOKEN, "max_retries": 0, "timeout": 60, **kwargs}
    return openai.OpenAI(base_url=f"{server.url}/falcon/v1", **options)


def async_client(server: Server) -> Any:
    return openai.AsyncOpenAI(base_url=f"{server.url}/falcon/v1", api_key=TOKEN, max_retries=0, timeout=60)


def test_the_sdk_lists_the_model_and_completes_without_streaming(server: Server) -> None:
    sdk = client(server)
    assert [m.id for m in sdk.models.list()] == [NAME]
    completion = sdk.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.model == NAME
    assert completion.choices[0].finish_reason in {"length", "stop"} and completion.choices[0].text
    assert completion.usage is not None and completion.usage.prompt_tokens == 4
    chat = sdk.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0, seed=1
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content is not None
    assert chat.usage is not None and chat.usage.completion_tokens <= 12


def test_the_sdk_streams_chat_chunk_by_chunk_with_the_usage_at_the_end(server: Server) -> None:
    sdk = client(server)
    messages = [{"role": "user", "content": PROMPT}]
    # Seeded: the same draws whether streamed or not, whatever else is in the batch.
    body: dict[str, Any] = {"model": NAME, "messages": messages, "max_tokens": 400, "seed": 7}
    whole = sdk.chat.completions.create(**body, extra_body={"min_tokens": 400})
    started = time.monotonic()
    arrivals: list[tuple[float, Any]] = []
    stream = sdk.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}, extra_body={"min_tokens": 400}
    )
    for chunk in stream:
        arrivals.append((time.monotonic() - started, chunk))
    chunks = [chunk for _, chunk in arrivals]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 400 and chunks[-1].usage == whole.usage
    # Streamed, not collected: the text arrives over the generation, the first piece early.
    times = [t for t, c in arrivals if c.choices and c.choices[0].delta.content]
    assert times[0] < 0.5 * times[-1]
    assert times[len(times) // 2] - times[0] > 0.2 * (times[-1] - times[0])


def test_the_async_sdk_streams_and_completes(server: Server) -> None:
    async def run() -> tuple[str, str]:
        sdk = async_client(server)
        try:
            body = {"model": NAME, "prompt": PROMPT, "max_tokens": 20, "seed": 3}
            whole = await sdk.completions.create(**body)
            stream = await sdk.completions.create(**body, stream=True)
            pieces = [chunk.choices[0].text async for chunk in stream]
            return whole.choices[0].text, "".join(pieces)
        finally:
            await sdk.close()

    whole, streamed = asyncio.run(run())
    assert whole and streamed == whole


def test_refusals_raise_the_sdks_own_errors(server: Server) -> None:
    sdk = client(server)
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=NAME, messages=messages, n=2)
    assert (
        bad.value.status_code == 400 and bad.value.param == "n" and bad.value.code == "unsupported_parameter"
    )
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=NAME, messages=messages, logprobs=True, stream=True)
    assert bad.value.param == "logprobs"  # before the stream: a plain HTTP error, not a broken stream
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.completions.create(model="gpt-4o", prompt=PROMPT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError) as refused:
        client(server, api_key="not-the-token-0123456789").models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


def test_a_client_that_closes_mid_stream_takes_its_row_out_of_the_batch(server: Server) -> None:
    wait_idle(server)
    sdk = client(server)
    stream = sdk.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=2000, stream=True, extra_body={"min_tokens": 2000}
    )
    received = [chunk for chunk, _ in zip(stream, range(20), strict=False)]
    stream.close()
    closed_at = time.monotonic()
    wait_idle(server)
    stopped_after = time.monotonic() - closed_at
    deadline = time.monotonic() + 5
    while (last := health(server)["last_generation"])["finish_reason"] != "cancelled":
        assert time.monotonic() < deadline, last
        time.sleep(0.02)
    assert last["tokens_after_cancel"] <= 1 and len(received) - 1 <= last["generated_tokens"] < 1000
    assert stopped_after < 2


def test_a_client_that_leaves_before_the_whole_answer_stops_its_generation(server: Server) -> None:
    wait_idle(server)
    before = health(server)["finished"].get("cancelled", 0)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2000, "min_tokens": 2000}  # stream: false
    data = json.dumps(body).encode()
    leaving = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    leaving.sendall(
        b"POST /falcon/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    deadline = time.monotonic() + 10
    while health(server)["running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    leaving.close()  # gone before any byte of the answer
    deadline = time.monotonic() + 3
    while (last := health(server))["finished"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation went on without its client"
        time.sleep(0.02)
    assert last["last_generation"]["tokens_after_cancel"] <= 1
    assert last["last_generation"]["generated_tokens"] < 2000


def test_langchains_chat_openai_invokes_and_streams(server: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model=NAME,
        base_url=f"{server.url}/falcon/v1",
        api_key=TOKEN,
        seed=5,
        max_tokens=25,
        max_retries=0,
        stream_usage=True,
    )
    answer = llm.invoke("Tell me a story")
    assert isinstance(answer.content, str) and answer.usage_metadata is not None
    chunks = list(llm.stream("Tell me a story"))
    assert len(chunks) > 2
    assert "".join(str(chunk.content) for chunk in chunks) == answer.content
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.usage_metadata is not None
    assert merged.usage_metadata["output_tokens"] == answer.usage_metadata["output_tokens"]
    assert merged.response_metadata.get("finish_reason") in {"length", "stop"}


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    """One row at a time, two waiting, a keep-alive comment every 0.1 s of silence."""
    extra = env(model_dir, FALCON_MAX_BATCH="1", FALCON_MAX_QUEUE="2", EXAMPLE_SSE_RUN_KEEPALIVE="0.1")
    with gunicorn("wsgi:app", tmp_path=tmp_path_factory.mktemp("queued"), env=extra) as srv:
        wait_ready(srv)
        yield srv


def occupy(server: Server) -> requests.Response:
    """A long raw stream holding the one row; close it to free the row."""
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 2000, "min_tokens": 2000, "stream": True}
    response = requests.post(
        f"{server.url}/falcon/v1/completions", json=body, headers=NO_GZIP, stream=True, timeout=60
    )
    assert response.raw.read(64)  # (a dropped iter_content generator would close the connection)
    return response


def test_keepalive_comments_while_queued_do_not_break_the_sdk_and_a_full_queue_is_503(queued: Server) -> None:
    server = queued
    running = occupy(server)
    results: dict[str, Any] = {}

    def with_sdk() -> None:
        try:
            stream = client(server, api_key="unused").chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=5, stream=True,
                stream_options={"include_usage": True}, extra_body={"min_tokens": 5},
            )  # fmt: skip
            results["sdk"] = [chunk for chunk in stream]
        except BaseException as exc:
            results["sdk"] = exc

    def raw() -> None:
        body = {
            "model": NAME,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 5,
            "stream": True,
        }
        url = f"{server.url}/falcon/v1/chat/completions"
        results["raw"] = requests.post(url, json=body, headers=NO_GZIP, timeout=60).content

    threads = [threading.Thread(target=with_sdk), threading.Thread(target=raw)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while health(server)["waiting"] < 2:
            assert time.monotonic() < deadline, health(server)
            time.sleep(0.02)
        with pytest.raises(openai.InternalServerError) as busy:  # 503: the SDK's 5xx error
            client(server).completions.create(model=NAME, prompt=PROMPT, max_tokens=2)
        assert busy.value.status_code == 503 and busy.value.response.headers["Retry-After"] == "5"
        time.sleep(0.5)  # both wait for the row: several keep-alive comments meanwhile
    finally:
        running.close()  # not a resumable run: its row leaves at once, the waiting ones go on
        for thread in threads:
            thread.join(60)
    chunks = results["sdk"]
    assert isinstance(chunks, list), chunks
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "length"
    # Five tokens, in as many text chunks or fewer: a token that ends inside a UTF-8 character
    # (the random model's byte tokens) is sent with the next one, and a sampled <unk> has no
    # text (five of them, rarely, make no text chunk at all).
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert len([c for c in chunks[:-1] if c.choices[0].delta.content]) <= 5
    # The raw client saw the comments the SDK read past: before the first generated chunk
    # (text, or the finish when there is none).
    wire: bytes = results["raw"]
    generated = [wire.find(b'"delta":{"content":'), wire.find(b'"finish_reason":"length"')]
    first_generated = min(position for position in generated if position >= 0)
    assert wire.index(b": ping\n\n") < first_generated
    assert wire.count(b": ping\n\n") >= 2
    assert b"id:" not in wire and b"event:" not in wire and b"retry:" not in wire
    assert wire.endswith(b"data: [DONE]\n\n")


def test_a_client_that_leaves_while_queued_gives_its_place_back_at_once(queued: Server) -> None:
    server = queued
    wait_idle(server)
    running = occupy(server)
    try:
        body = json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 5, "stream": True}).encode()
        waiting = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        waiting.sendall(
            b"POST /falcon/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while health(server)["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting.close()
        deadline = time.monotonic() + 2
        while health(server)["waiting"]:
            assert time.monotonic() < deadline, "the place was not given back"
            time.sleep(0.02)
        assert health(server)["running"] == 1
    finally:
        running.close()
    wait_idle(server)


def test_a_stream_cut_by_the_shutdown_ends_with_an_error_the_sdk_raises(
    tmp_path: Path, model_dir: Path
) -> None:
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env(model_dir)) as srv:
        wait_ready(srv)
        stream = client(srv).completions.create(
            model=NAME, prompt=PROMPT, max_tokens=2000, stream=True, extra_body={"min_tokens": 2000}
        )
        received = []
        with pytest.raises(openai.APIError) as failed:
            for chunk in stream:
                received.append(chunk)
                if len(received) == 10:
                    srv.process.send_signal(signal.SIGTERM)  # gunicorn's graceful shutdown
        srv.process.wait(timeout=30)
    assert len(received) >= 10 and "shutting down" in failed.value.message
    assert failed.value.body == {
        "message": "the server is shutting down; send the request again",
        "type": "server_error",
        "param": None,
        "code": "shutdown",
    }
