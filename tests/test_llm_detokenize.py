from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from hypothesis import given, settings
from hypothesis import strategies as st

from flask_sse_run.llm import IncrementalDetokenizer
from tests.tiny_falcon import byte_bpe_tokenizer, word_tokenizer

TEXTS = [
    "Tell me a story about the café ☃ in Zürich 🎉🙂!",
    "Les élèves déjà prêts — 東京 and 北京; Привет мир ★ ♥ €100",
    "e\u0301 combines, “quotes” … and emoji 🙂🙂🙂 at the end 🎉",
]


@pytest.fixture(scope="module")
def bpe() -> Any:
    return byte_bpe_tokenizer()


def stream(tokenizer: Any, ids: list[int], context: list[int] | None = None) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, context or [])
    pieces = [detokenizer.push(token) for token in ids]
    return [*pieces, detokenizer.flush()]


def byte_tokens(tokenizer: Any, text: str) -> list[int]:
    """One token per byte: every multi-byte character is split across tokens."""
    return [tokenizer.convert_tokens_to_ids(BYTE_CHARS[b]) for b in text.encode("utf-8")]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table: the printable character the byte-level pre-tokenizer uses for each byte.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_CHARS = _bytes_to_unicode()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_of_byte_level_bpe_tokens_join_to_the_full_decode(bpe: Any, text: str) -> None:
    ids = bpe.encode(text)
    pieces = stream(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("text", TEXTS)
def test_a_character_split_over_byte_tokens_is_held_back_until_complete(bpe: Any, text: str) -> None:
    ids = byte_tokens(bpe, text)
    pieces = stream(bpe, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    # "☃" is three bytes: its first two tokens give no text, the third gives the whole character.
    if "☃" in text:
        assert "☃" in pieces


def test_spaces_between_words_are_kept_with_a_word_level_tokenizer() -> None:
    tokenizer = word_tokenizer()
    prompt = tokenizer.encode("Tell me a story")
    ids = tokenizer.encode("Once upon a time there was one old cat")
    pieces = stream(tokenizer, ids, context=prompt)
    assert pieces[:3] == [" Once", " upon", " a"]
    assert "".join(pieces) == " " + tokenizer.decode(ids)


def test_the_first_piece_keeps_its_space_after_the_prompt(bpe: Any) -> None:
    prompt, output = bpe.encode("Tell me a story"), bpe.encode(" about the café")
    assert "".join(stream(bpe, output, context=prompt)) == " about the café"


def test_special_tokens_are_skipped(bpe: Any) -> None:
    ids = [*bpe.encode("the café"), bpe.eos_token_id]
    assert "".join(stream(bpe, ids)) == "the café"


def test_each_push_decodes_a_bounded_window() -> None:
    tokenizer = word_tokenizer()
    lengths: list[int] = []

    class Counting:
        def decode(self, token_ids: Any, skip_special_tokens: bool = True) -> str:
            lengths.append(len(token_ids))
            return str(tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    ids = tokenizer.encode(" ".join(["story"] * 2000))
    detokenizer = IncrementalDetokenizer(Counting())
    assert "".join(detokenizer.push(token) for token in ids) == tokenizer.decode(ids)
    assert max(lengths) <= 17
    assert len(lengths) < 1.2 * len(ids)  # one decode a token, and one more per slide


def test_window_must_be_longer_than_context() -> None:
    with pytest.raises(ValueError):
        IncrementalDetokenizer(word_tokenizer(), context=4, window=4)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_token_sequence_streams_exactly_its_decode(bpe: Any, data: st.DataObject) -> None:
    # Ids drawn from the whole vocabulary: lone bytes, invalid UTF-8, special tokens and all.
    ids = data.draw(st.lists(st.integers(0, len(bpe) - 1), max_size=60))
    pieces = stream(bpe, ids)
    full = bpe.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in piece for piece in pieces)
