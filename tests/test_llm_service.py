from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from flask_sse_run import RequestError
from flask_sse_run.llm import GenerationParams, GenerationService, LoadedModel


class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def fake_model(context: int = 100) -> LoadedModel:
    return LoadedModel(
        model=None, tokenizer=WordTokenizer(), device="cpu", dtype="float32", parameters=1, context=context,
        load_seconds=0.0,
    )  # fmt: skip


def service(loads: list[int] | None = None, **kwargs: Any) -> GenerationService:
    def loader(source: str, log: Callable[[str], object]) -> LoadedModel:
        if loads is not None:
            loads.append(os.getpid())
        return fake_model()

    return GenerationService("some/model", loader=loader, prepare=lambda: None, **kwargs)


def ready(svc: GenerationService) -> GenerationService:
    deadline = time.monotonic() + 10
    while svc.status == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.status == "ready"
    return svc


def test_loading_starts_once_per_process_and_again_after_a_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[int] = []
    svc = ready(service(loads))
    svc.start()
    parent = os.getpid()
    assert loads == [parent]
    monkeypatch.setattr(os, "getpid", lambda: 1)  # as in a worker forked from this process
    ready(svc)
    assert loads == [parent, 1]


def test_without_a_source_the_service_is_disabled_and_never_loads() -> None:
    svc = GenerationService(None, disabled_hint="set X", loader=lambda *a: pytest.fail("loaded"))
    svc.start()
    assert svc.health() == {"status": "disabled", "message": "no model is configured: set X"}
    with pytest.raises(RequestError) as refused:
        svc.stream("hi", GenerationParams())
    assert refused.value.status == 503 and "set X" in refused.value.message


def test_a_failing_import_is_reported_as_a_failed_load() -> None:
    def missing() -> None:
        raise ImportError("No module named 'torch'")

    svc = GenerationService("some/model", prepare=missing)
    assert svc.status == "failed"
    assert "No module named 'torch'" in svc.health()["error"] and "llm extra" in svc.health()["error"]


def test_prompts_that_do_not_fit_the_context_are_refused_with_422() -> None:
    svc = ready(service())
    with pytest.raises(RequestError) as refused:
        svc.stream("word " * 100, GenerationParams(max_new_tokens=1))
    assert refused.value.status == 422 and refused.value.detail[0]["loc"] == ["prompt"]  # type: ignore[index]
    with pytest.raises(RequestError) as refused:
        svc.stream("word " * 60, GenerationParams(max_new_tokens=41))
    assert refused.value.detail[0]["loc"] == ["max_new_tokens"]  # type: ignore[index]
    with pytest.raises(RequestError) as refused:
        svc.stream("   ", GenerationParams())
    assert refused.value.detail[0]["msg"] == "has no tokens"  # type: ignore[index]


def test_a_stream_closed_before_it_starts_gives_its_place_back() -> None:
    svc = ready(service(max_queue=0))
    params = GenerationParams(max_new_tokens=10)
    stream = svc.stream("hello", params)
    with pytest.raises(RequestError):
        svc.stream("hello", params)  # the only place is taken
    stream.close()  # type: ignore[attr-defined]
    svc.stream("hello", params).close()  # type: ignore[attr-defined]
    assert (svc.queue.running, svc.queue.waiting) == (0, 0)
