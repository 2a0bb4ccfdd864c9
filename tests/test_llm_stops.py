from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flask_sse_run.llm import StopStrings


def run(stop: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopStrings(stop)
    out = [matcher.feed(piece) for piece in pieces]
    out.append(matcher.flush())
    return out, matcher.stopped


def test_output_ends_before_the_stop_string() -> None:
    out, stopped = run(["END"], ["one ", "two END three", " four"])
    assert "".join(out) == "one two " and stopped


def test_a_stop_string_split_across_pieces_is_found() -> None:
    out, stopped = run(["\nUser:"], ["Hello", "\nUs", "er", ": more"])
    assert out[:2] == ["Hello", ""]  # "\nUs" may start the stop string: held back
    assert "".join(out) == "Hello" and stopped


def test_held_back_text_is_released_when_it_is_not_a_stop_string() -> None:
    out, stopped = run(["\nUser:"], ["Hello", "\nUs", "eful"])
    assert out == ["Hello", "", "\nUseful", ""] and not stopped


def test_held_back_text_is_released_at_the_end() -> None:
    out, stopped = run(["stop"], ["a sto"])
    assert out == ["a ", "sto"] and not stopped


def test_the_earliest_of_several_stop_strings_wins() -> None:
    out, _ = run(["b", "a"], ["xxab"])
    assert "".join(out) == "xx"


def test_without_stop_strings_pieces_pass_through() -> None:
    assert run([], ["a", "b"]) == (["a", "b", ""], False)


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        StopStrings([""])


@given(
    text=st.text(alphabet="ab\n:", max_size=40),
    stop=st.lists(st.text(alphabet="ab\n:", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_any_split_gives_the_text_before_the_first_stop_string(
    text: str, stop: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = run(stop, pieces)
    first = min((i for i in (text.find(s) for s in stop) if i >= 0), default=None)
    assert "".join(out) == (text if first is None else text[:first])
    assert stopped == (first is not None)


def test_a_longer_stop_string_starting_earlier_wins_over_a_shorter_one_found_first() -> None:
    # Found by Hypothesis: after "a:" the ":" stop is complete, but "a::" (starting earlier)
    # may still complete with the next piece, and does.
    out, stopped = run([":", "a::"], ["a:", ":"])
    assert "".join(out) == "" and stopped


def test_a_stop_string_completed_only_in_held_text_ends_the_output_at_flush() -> None:
    out, stopped = run([":", "a::x"], ["a:", ":"])
    assert "".join(out) == "a" and stopped
