"""Choosing each row's next token from one step's logits, with each row's own parameters."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

pytest.importorskip("torch")

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from flask_sse_run.llm import GenerationParams
from flask_sse_run.llm.rows import Row
from flask_sse_run.llm.sampling import RowSampler, choose_tokens
from tests.tiny_falcon import word_tokenizer

VOCAB = 12
EOS = 1
TOKENIZER = word_tokenizer()


def row(prompt: list[int] | None = None, **params: Any) -> Row:
    made = Row(prompt or [2, 3], GenerationParams(**params), TOKENIZER, {EOS}, started=0.0)
    made.sampler = RowSampler(made, VOCAB, torch.device("cpu"))
    return made


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


RISING = [float(i) for i in range(VOCAB)]  # token 11 most likely, then 10, ...


def test_greedy_rows_take_the_argmax() -> None:
    scores = logits(RISING, RISING[::-1])
    assert choose_tokens(scores, [row(temperature=0), row(temperature=0)]) == [VOCAB - 1, 0]


def test_the_repetition_penalty_is_transformers_one_over_the_prompt_and_the_tokens_so_far() -> None:
    scores = torch.randn(1, VOCAB)
    penalized = row(prompt=[4, 7], temperature=0, repetition_penalty=1.7)
    penalized.sampler.saw(9)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[4, 7, 9]]), scores.clone())
    plain = row(temperature=0)
    both = torch.cat([scores, scores])
    choose_tokens(both, [penalized, plain])
    assert torch.equal(both[0], expected[0])
    assert torch.equal(both[1], scores[0])  # a row without a penalty is untouched


def test_no_eos_before_min_new_tokens() -> None:
    favour_eos = [0.0] * VOCAB
    favour_eos[EOS] = 10.0
    early = row(temperature=0, min_new_tokens=3, max_new_tokens=5)
    assert choose_tokens(logits(favour_eos), [early]) != [EOS]
    early.generated = 3
    assert choose_tokens(logits(favour_eos), [early]) == [EOS]


def test_top_k_one_and_a_tiny_top_p_take_the_most_likely_token_whatever_the_temperature() -> None:
    rows = [row(temperature=2.0, top_k=1, top_p=1.0, seed=s) for s in range(20)]
    rows += [row(temperature=2.0, top_k=0, top_p=0.01, seed=s) for s in range(20)]
    assert set(choose_tokens(logits(*[RISING] * 40), rows)) == {VOCAB - 1}


def test_draws_follow_the_filtered_distribution() -> None:
    sampler = row(temperature=1.0, top_k=3, top_p=1.0, seed=5)
    draws = Counter(choose_tokens(logits(RISING), [sampler])[0] for _ in range(3000))
    assert set(draws) <= {9, 10, 11}  # top-k keeps the three most likely
    probabilities = torch.tensor(RISING[-3:]).softmax(-1).tolist()  # 0.09, 0.24, 0.67
    for token, probability in zip((9, 10, 11), probabilities, strict=True):
        assert abs(draws[token] / 3000 - probability) < 0.05


def test_top_p_keeps_the_fewest_tokens_that_reach_the_mass() -> None:
    # Probabilities 0.5, 0.3, 0.2 (tokens 0, 1, 2): top_p 0.75 keeps 0 and 1, 0.85 all three.
    scores = [float("-inf")] * VOCAB
    scores[0:3] = torch.tensor([0.5, 0.3, 0.2]).log().tolist()
    for top_p, kept in ((0.75, {0, 1}), (0.85, {0, 1, 2})):
        sampler = row(temperature=1.0, top_k=0, top_p=top_p, seed=1)
        assert {choose_tokens(logits(scores), [sampler])[0] for _ in range(400)} == kept


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_the_step() -> None:
    noisy = torch.randn(VOCAB).tolist()

    def draws(companions: int) -> list[int]:
        seeded = row(temperature=1.0, top_k=0, top_p=1.0, seed=42)
        others = [row(temperature=0.7, seed=None) for _ in range(companions)]
        out = []
        for _ in range(50):
            out.append(choose_tokens(logits(*([noisy] * companions), noisy), [*others, seeded])[-1])
        return out

    assert draws(0) == draws(3) == draws(7)
    assert len(set(draws(0))) > 3  # it does sample
