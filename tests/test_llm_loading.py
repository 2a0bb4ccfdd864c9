from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

import torch
import transformers

from flask_sse_run.llm import load_kwargs, load_pretrained
from tests.tiny_falcon import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("model"))


def test_cuda_means_bf16_spread_over_the_gpus_and_cpu_means_float32() -> None:
    assert load_kwargs(cuda=True) == {"dtype": torch.bfloat16, "device_map": "auto"}
    assert load_kwargs(cuda=False) == {"dtype": torch.float32}


def test_with_cuda_available_the_loader_asks_for_bf16_and_device_map_auto(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: dict[str, Any] = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(source: str, **kwargs: Any) -> Any:
        asked.update(kwargs)
        return real(source)  # the CPU model: this machine has no GPU

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    lines: list[str] = []
    load_pretrained(str(model_dir), lines.append)
    assert asked == {"dtype": torch.bfloat16, "device_map": "auto"}
    assert any("bfloat16 on the GPUs (device_map=auto)" in line for line in lines)


def test_on_cpu_the_model_loads_in_float32_and_reports_its_progress(model_dir: Path) -> None:
    lines: list[str] = []
    loaded = load_pretrained(str(model_dir), lines.append)
    assert (loaded.device, loaded.dtype, loaded.context) == ("cpu", "float32", 4096)
    assert loaded.parameters == sum(p.numel() for p in loaded.model.parameters())
    assert not loaded.model.training
    assert [line.split(" ")[0] for line in lines] == ["loading", "loading", "loaded"]


def test_a_missing_model_raises_without_downloading(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_pretrained(str(tmp_path / "nothing-here"))
