"""The upstream service: request mapping, refusals of what the engine cannot do, chunks, and
vLLM's stream shapes (``transformers serve``'s are in test_upstream_live.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from flask_sse_run import ConfigurationError, RequestError, UpstreamError
from flask_sse_run.llm import GenerationParams, UpstreamService
from flask_sse_run.llm.upstream import _ABSENT, _chunk, _finish_reason
from tests.live import Server, gunicorn
from tests.upstreams import wait_answering

URL = "http://127.0.0.1:9/v1"
STREAM = {"stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    ("params", "service", "expected"),
    [
        (
            GenerationParams(max_new_tokens=5, temperature=0),
            {},
            {"prompt": "p", "max_tokens": 5, "temperature": 0, **STREAM},  # greedy: no top_p
        ),
        (
            GenerationParams(max_new_tokens=5, temperature=0.8, top_p=0.5, seed=7, stop=("a", "b")),
            {"model": "falcon"},
            {
                "prompt": "p", "max_tokens": 5, "temperature": 0.8, "top_p": 0.5, "seed": 7,
                "stop": ["a", "b"], "model": "falcon", **STREAM,
            },
        ),
        (
            GenerationParams(
                max_new_tokens=5, temperature=0.8, top_k=5, repetition_penalty=1.2, min_new_tokens=2
            ),
            {"extensions": ["top_k", "repetition_penalty", "min_new_tokens"]},
            {
                "prompt": "p", "max_tokens": 5, "temperature": 0.8, "top_p": 0.9, "top_k": 5,
                "repetition_penalty": 1.2, "min_tokens": 2, **STREAM,
            },  # vLLM's names
        ),
        (
            GenerationParams(max_new_tokens=5, temperature=0, top_k=5),
            {},
            {"prompt": "p", "max_tokens": 5, "temperature": 0, **STREAM},  # top_k means nothing when greedy
        ),
        (
            GenerationParams(max_new_tokens=5, temperature=0.7),
            {},
            # top_k=50 is the default: not sent, the engine's own default applies
            {"prompt": "p", "max_tokens": 5, "temperature": 0.7, "top_p": 0.9, **STREAM},
        ),
    ],
)  # fmt: skip
def test_parameters_map_to_the_completions_request(
    params: GenerationParams, service: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert UpstreamService(URL, **service).request_body("p", params) == expected


def test_parameters_the_engine_cannot_take_are_refused_with_422_listing_each() -> None:
    params = GenerationParams(temperature=0.7, top_k=5, repetition_penalty=1.2, min_new_tokens=2)
    with pytest.raises(RequestError) as refused:
        UpstreamService(URL, extensions=["top_k"]).request_body("p", params)
    assert refused.value.status == 422
    assert [d["loc"] for d in refused.value.detail or []] == [["repetition_penalty"], ["min_new_tokens"]]
    assert all(d["type"] == "unsupported" for d in refused.value.detail or [])


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://host/v1", "http:///v1", "http://h/v1?x=1"])
def test_a_bad_upstream_url_fails_at_start_up(url: str) -> None:
    with pytest.raises(ConfigurationError):
        UpstreamService(url)


def test_an_unknown_extension_fails_at_start_up() -> None:
    with pytest.raises(ConfigurationError, match="top_a"):
        UpstreamService(URL, extensions=["top_a"])


@pytest.mark.parametrize(
    ("reason", "stop_reason", "stop_strings", "expected"),
    [
        ("length", _ABSENT, False, "length"),
        ("stop", _ABSENT, False, "eos"),  # no stop string asked for: end of sequence
        ("stop", _ABSENT, True, "stop"),  # cannot tell: OpenAI's own meaning
        ("stop", None, True, "eos"),  # vLLM: None is EOS
        ("stop", "###", True, "stop"),
        ("stop", 50256, True, "stop"),  # vLLM: a stop token id
        (None, _ABSENT, False, "eos"),  # [DONE] without a reason
    ],
)
def test_the_engines_finish_reason_maps_to_ours(
    reason: str | None, stop_reason: Any, stop_strings: bool, expected: str
) -> None:
    assert _finish_reason(reason, stop_reason, stop_strings) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"error": "substring not found"}', "the upstream failed mid-stream: substring not found"),
        (
            '{"error": {"message": "CUDA out of memory", "code": 500}}',
            "the upstream failed mid-stream: CUDA out of memory",
        ),
        ('{"object": "error", "message": "aborted", "code": 500}', "the upstream failed mid-stream: aborted"),
        ("not json", "the upstream sent an event that is not JSON"),
        ("[1, 2]", "the upstream sent an event that is not a JSON object"),
    ],
)
def test_error_chunks_and_garbage_raise_an_upstream_error(data: str, message: str) -> None:
    with pytest.raises(UpstreamError) as failed:
        _chunk(data)
    assert (failed.value.status, failed.value.message) == (502, message)


# -- vLLM's stream shapes, from a real server (tests/relay_apps.py's synthetic engine) --------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    app = "tests.relay_apps:engine_app()"
    with gunicorn(app, tmp_path=tmp_path_factory.mktemp("engine"), config={"ENGINE_INTERVAL": 0}) as server:
        wait_answering(f"{server.url}/v1/models", server.process, server.log_path, 30)
        yield server


def generate(server: Server, prompt: str, **params: Any) -> tuple[str, dict[str, Any]]:
    items = list(
        UpstreamService(f"{server.url}/v1").stream(prompt, GenerationParams(temperature=0, **params))
    )
    assert [item["index"] for item in items[:-1]] == list(range(len(items) - 1))
    return "".join(item["text"] for item in items[:-1]), items[-1]


def test_the_usage_chunk_and_done_end_a_stream(synthetic: Server) -> None:
    text, summary = generate(synthetic, "x", max_new_tokens=5)
    assert text == " tok0 tok1 tok2 tok3 tok4"
    assert (summary["finish_reason"], summary["generated_tokens"]) == ("length", 5)


def test_a_stop_string_the_engine_strips_is_reported_by_its_stop_reason(synthetic: Server) -> None:
    text, summary = generate(synthetic, "x", max_new_tokens=10, stop=("tok3",))
    assert text == " tok0 tok1 tok2 "  # the engine cut it: our own stop check never saw it
    assert (summary["finish_reason"], summary["generated_tokens"]) == ("stop", 3)


def test_an_end_of_sequence_is_reported_as_eos(synthetic: Server) -> None:
    text, summary = generate(synthetic, "eos", max_new_tokens=10)
    assert text == " tok0 tok1 tok2" and summary["finish_reason"] == "eos"


def ports(server: Server) -> list[str]:
    """The client port of each completion request the engine has had."""
    return requests.get(f"{server.url}/stats", timeout=5).json()["ports"]  # type: ignore[no-any-return]


def test_streams_read_to_their_end_reuse_one_connection(synthetic: Server) -> None:
    for _ in range(3):
        generate(synthetic, "x", max_new_tokens=2)
    # Read on past [DONE] to the body's end: the connection goes back to the pool, open.
    assert len(set(ports(synthetic)[-3:])) == 1
    stream = UpstreamService(f"{synthetic.url}/v1").stream(
        "x", GenerationParams(max_new_tokens=50, temperature=0)
    )
    next(stream)
    stream.close()  # a client that left: that connection is closed, not pooled half-read
    generate(synthetic, "x", max_new_tokens=2)
    assert ports(synthetic)[-1] != ports(synthetic)[-2]
