"""OpenAI's protocol (flask_sse_run/llm/openai_api.py): request validation, chunks byte for byte,
the error shape, the end of a stream. Pure: no server, no model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from flask_sse_run.errors import RequestError, UpstreamError
from flask_sse_run.events import encode
from flask_sse_run.llm.openai_api import (
    CHAT_STOP,
    DONE,
    ChatRequest,
    ChunkStream,
    CompletionRequest,
    OpenAIError,
    as_openai_error,
    collect,
    fallback_chat_prompt,
    models_list,
    parse_request,
    stream_closer,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "m", "prompt": "Once"}
SECRET = "s3cr3t-value-never-echoed"


def refusal(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(OpenAIError) as caught:
        parse_request(kind, body)  # type: ignore[arg-type]
    assert caught.value.status == 400
    error: dict[str, Any] = caught.value.body()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert SECRET not in json.dumps(error)
    return error


def test_a_field_openai_does_not_have_is_refused_as_openai_refuses_it() -> None:
    error = refusal("chat", {**CHAT, "bogus": SECRET})
    assert error == {
        "message": "Unrecognized request argument supplied: bogus",
        "type": "invalid_request_error",
        "param": "bogus",
        "code": "unknown_parameter",
    }


@pytest.mark.parametrize(
    ("kind", "change", "param"),
    [
        ("chat", {"n": 2}, "n"),
        ("completion", {"n": 3}, "n"),
        ("completion", {"best_of": 2}, "best_of"),
        ("completion", {"logprobs": 0}, "logprobs"),
        ("completion", {"echo": True}, "echo"),
        ("completion", {"suffix": "end"}, "suffix"),
        ("completion", {"prompt": ["a", "b"]}, "prompt"),
        ("completion", {"prompt": [1, 2, 3]}, "prompt"),
        ("chat", {"logprobs": True}, "logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"tool_choice": "auto"}, "tool_choice"),
        ("chat", {"functions": [{"name": "f"}]}, "functions"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
        ("chat", {"frequency_penalty": -1}, "frequency_penalty"),
        ("chat", {"logit_bias": {"50256": -100}}, "logit_bias"),
        ("chat", {"modalities": ["text", "audio"]}, "modalities"),
        ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
        (
            "chat",
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
        ("chat", {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_what_would_change_the_output_and_is_not_done_here_is_refused_never_ignored(
    kind: str, change: dict[str, Any], param: str
) -> None:
    error = refusal(kind, {**(CHAT if kind == "chat" else COMPLETION), **change})
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")
    assert error["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    "change",
    [
        {"n": 1, "best_of": 1, "echo": False, "suffix": "", "logprobs": None, "presence_penalty": 0},
        {"user": "u-1", "frequency_penalty": 0.0, "logit_bias": {}, "prompt": ["Once"]},
        {"top_k": 5, "repetition_penalty": 1.2, "min_tokens": 3, "seed": -5},
    ],
)
def test_what_changes_nothing_is_accepted(change: dict[str, Any]) -> None:
    assert isinstance(parse_request("completion", {**COMPLETION, **change}), CompletionRequest)


def test_chat_accepts_text_parts_developer_messages_and_fields_that_change_nothing() -> None:
    body = {
        **CHAT,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Tell"}, {"type": "text", "text": "me"}]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "more", "name": "ann"},
        ],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "metadata": {"a": "b"},
        "store": False,
        "parallel_tool_calls": True,
        "service_tier": "auto",
    }
    request = parse_request("chat", body)
    assert isinstance(request, ChatRequest)
    assert request.conversation() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell\nme"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "more", "name": "ann"},
    ]


def test_validation_problems_are_all_named_without_echoing_values() -> None:
    error = refusal("chat", {"messages": [], "temperature": 3, "max_tokens": 0, "stop": 5, "user": 7})
    assert error["param"] == "model" and error["code"] == "missing_required_parameter"
    for name in ("model", "messages", "temperature", "max_tokens", "stop", "user"):
        assert f"{name}: " in error["message"] or f"{name}." in error["message"], name


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": 2**63}, "seed"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_bad_values_name_their_parameter(change: dict[str, Any], param: str) -> None:
    assert refusal("chat", {**CHAT, **change})["param"] == param


def test_parameters_take_openais_defaults_and_the_templates_stop_string() -> None:
    request = parse_request("chat", {**CHAT, "stop": "END"})
    params = request.params(32, (CHAT_STOP,))
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (32, 1.0, 1.0, 0)
    assert params.stop == ("END", CHAT_STOP) and params.seed is None and params.min_new_tokens == 0
    completion = parse_request("completion", {**COMPLETION, "min_tokens": 50, "temperature": 0, "seed": 3})
    assert isinstance(completion, CompletionRequest) and completion.max_tokens == 16  # OpenAI's default
    params = completion.params(16)
    assert (params.min_new_tokens, params.greedy, params.seed) == (16, True, 3)


def test_the_fallback_chat_template_is_one_line_a_message_then_the_assistants_turn() -> None:
    prompt = fallback_chat_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Tell me a story", "name": "ann"},
        ]
    )
    assert prompt == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Tell me a story\nAssistant:"
    assert CHAT_STOP == "\nUser:"


def items(*texts: str, finish: str = "length", prompt_tokens: int | None = 4) -> Iterator[dict[str, Any]]:
    for i, text in enumerate(texts):
        yield {"text": text, "index": i}
    yield {"finish_reason": finish, "generated_tokens": len(texts), "prompt_tokens": prompt_tokens}


def wire(chunks: ChunkStream) -> bytes:
    return b"".join(encode(chunk) for chunk in chunks)


def test_chat_chunks_byte_for_byte_role_first_then_pieces_finish_and_usage() -> None:
    chunks = ChunkStream(
        items(" Once", " upon"),
        kind="chat",
        model="m",
        include_usage=True,
        response_id="chatcmpl-1",
        created=7,
    )
    head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":'
    end = b',"finish_reason":null,"logprobs":null}],"usage":null}\n\n'
    assert wire(chunks) == (
        head + b'[{"index":0,"delta":{"role":"assistant","content":""}' + end
        + head + b'[{"index":0,"delta":{"content":" Once"}' + end
        + head + b'[{"index":0,"delta":{"content":" upon"}' + end
        + head + b'[{"index":0,"delta":{},"finish_reason":"length","logprobs":null}],"usage":null}\n\n'
        + head + b'[],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}\n\n'
    )  # fmt: skip


def test_completion_chunks_byte_for_byte_without_usage_and_eos_is_stop() -> None:
    chunks = ChunkStream(
        items(" a", finish="eos"), kind="completion", model="m", response_id="cmpl-1", created=7
    )
    head = b'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m","choices":'
    assert wire(chunks) == (
        head + b'[{"index":0,"text":" a","finish_reason":null,"logprobs":null}]}\n\n'
        + head + b'[{"index":0,"text":"","finish_reason":"stop","logprobs":null}]}\n\n'
    )  # fmt: skip


def test_a_generation_that_ends_without_a_reply_is_an_error_not_a_finish_reason() -> None:
    with pytest.raises(RuntimeError, match="cancelled"):
        list(ChunkStream(items("a", finish="cancelled"), kind="chat", model="m"))
    with pytest.raises(RuntimeError, match="without its summary"):
        list(ChunkStream(iter([{"text": "a", "index": 0}]), kind="completion", model="m"))


def test_closing_a_chunk_stream_closes_the_services_stream_even_before_it_started() -> None:
    class Service:
        closed = 0

        def __iter__(self) -> Service:
            return self

        def __next__(self) -> dict[str, Any]:
            raise StopIteration

        def close(self) -> None:
            self.closed += 1

    source = Service()
    ChunkStream(source, kind="chat", model="m").close()
    assert source.closed == 1


def test_a_whole_response_has_openais_shape() -> None:
    chat = collect(items(" Once", " upon", finish="stop"), kind="chat", model="m", response_id="chatcmpl-2")
    assert chat["object"] == "chat.completion" and chat["id"] == "chatcmpl-2" and chat["model"] == "m"
    assert chat["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " Once upon", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert chat["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    completion = collect(items(" a", prompt_tokens=None), kind="completion", model="m")
    assert completion["object"] == "text_completion" and completion["id"].startswith("cmpl-")
    assert completion["choices"] == [{"index": 0, "text": " a", "logprobs": None, "finish_reason": "length"}]
    assert completion["usage"] == {"prompt_tokens": None, "completion_tokens": 1, "total_tokens": None}


def test_a_stream_ends_with_done_after_one_error_event_when_it_failed_or_the_worker_stops() -> None:
    close = stream_closer(expose_errors=False, request_id="r1")
    assert close(None, False) == DONE == b"data: [DONE]\n\n"
    assert close(ValueError("internal detail"), False) == (
        b'data: {"error":{"message":"the generation failed (request id r1)","type":"server_error",'
        b'"param":null,"code":null}}\n\n' + DONE
    )
    upstream = close(UpstreamError(502, "the upstream connection broke mid-stream (IncompleteRead)"), False)
    assert json.loads(upstream.split(b"\n\n")[0][len(b"data: ") :])["error"] == {
        "message": "the upstream connection broke mid-stream (IncompleteRead)",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    shutdown = json.loads(close(None, True).split(b"\n\n")[0][len(b"data: ") :])["error"]
    assert shutdown["code"] == "shutdown" and "shutting down" in shutdown["message"]
    exposed = stream_closer(expose_errors=True, request_id="r1")(ValueError("detail"), False)
    assert b'"message":"ValueError: detail"' in exposed


def test_the_extensions_refusals_become_openai_errors_keeping_status_and_headers() -> None:
    too_long = RequestError(
        422,
        "invalid parameters",
        [{"loc": ["max_new_tokens"], "msg": "exceeds the model's context of 64 tokens", "type": "too_long"}],
    )
    error = as_openai_error(too_long, {"max_new_tokens": "max_tokens"})
    assert error.status == 400
    assert error.body() == {
        "error": {
            "message": "max_tokens: exceeds the model's context of 64 tokens",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "context_length_exceeded",
        }
    }
    busy = as_openai_error(RequestError(503, "the model is busy", headers={"Retry-After": "5"}))
    assert (busy.status, busy.headers, busy.body()["error"]["type"]) == (
        503,
        {"Retry-After": "5"},
        "server_error",
    )
    auth = as_openai_error(
        RequestError(401, "the bearer token is invalid", headers={"WWW-Authenticate": "Bearer"})
    )
    assert auth.body()["error"]["code"] == "invalid_api_key" and auth.headers == {
        "WWW-Authenticate": "Bearer"
    }


def test_the_models_list() -> None:
    assert models_list("tiiuae/falcon-7b-instruct", 5) == {
        "object": "list",
        "data": [
            {"id": "tiiuae/falcon-7b-instruct", "object": "model", "created": 5, "owned_by": "flask-sse-run"}
        ],
    }
