from __future__ import annotations

import logging
import os
import threading
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

    # A model that cannot run: these tests are about loading and admission, in the mode that
    # does not need one before a stream starts.
    return GenerationService("some/model", loader=loader, prepare=lambda: None, batching=False, **kwargs)


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


def settled(svc: GenerationService) -> GenerationService:
    deadline = time.monotonic() + 10
    while svc.status == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    return svc


def test_a_failing_import_is_reported_with_the_commands_that_install_the_extra() -> None:
    def missing() -> None:
        raise ImportError("No module named 'torch'")

    svc = settled(GenerationService("some/model", prepare=missing))
    assert svc.status == "failed"
    error = svc.health()["error"]
    assert "No module named 'torch'" in error
    # The installed package's extra, and the editable form from a checkout.
    assert "pip install 'flask-sse-run[llm]'" in error and "pip install -e '.[llm]'" in error
    assert "repository" not in error


def test_torch_is_imported_in_the_background_and_the_log_says_so_before_and_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    svc = GenerationService(
        "some/model",
        loader=lambda source, log: fake_model(),
        prepare=lambda: release.wait(10),
        batching=False,
        logger=logging.getLogger("test.llm.import"),
    )
    with caplog.at_level(logging.INFO, logger="test.llm.import"):
        began = time.monotonic()
        svc.start()  # returns while the import runs: the worker goes on serving
        assert time.monotonic() - began < 5
        health = svc.health()
        assert health["status"] == "loading" and health["step"] == "importing torch and transformers"
        release.set()
        settled(svc)
    messages = [record.getMessage() for record in caplog.records]
    importing = next(i for i, m in enumerate(messages) if "importing torch and transformers" in m)
    imported = next(i for i, m in enumerate(messages) if "imported torch and transformers in" in m)
    assert importing < imported


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
