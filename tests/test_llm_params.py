from __future__ import annotations

import pytest

from flask_sse_run.llm import GenerationParams


def test_temperature_zero_is_greedy_and_passes_no_sampling_parameter() -> None:
    kwargs = GenerationParams(temperature=0, top_p=0.5, top_k=3, max_new_tokens=7).generate_kwargs()
    assert kwargs == {
        "max_new_tokens": 7,
        "min_new_tokens": 0,
        "repetition_penalty": 1.0,
        "num_beams": 1,
        "do_sample": False,
    }


def test_a_positive_temperature_samples_with_every_sampling_parameter() -> None:
    params = GenerationParams(temperature=1.3, top_p=0.8, top_k=0, repetition_penalty=1.2, min_new_tokens=4)
    assert params.generate_kwargs() == {
        "max_new_tokens": 256,
        "min_new_tokens": 4,
        "repetition_penalty": 1.2,
        "num_beams": 1,
        "do_sample": True,
        "temperature": 1.3,
        "top_p": 0.8,
        "top_k": 0,
    }


def test_the_defaults_sample() -> None:
    assert GenerationParams().generate_kwargs()["do_sample"] is True
    assert not GenerationParams().greedy and GenerationParams(temperature=0).greedy


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"min_new_tokens": 5, "max_new_tokens": 4},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -1},
        {"repetition_penalty": 0},
    ],
)
def test_impossible_parameters_raise(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GenerationParams(**bad)  # type: ignore[arg-type]
