from __future__ import annotations

import pytest

from flask_sse_run.runs.ids import event_id, is_run_id, new_run_id, parse_event_id, parse_position

RUN = "0123456789abcdef0123456789abcdef"


def test_new_run_ids_are_128_random_bits_in_hex() -> None:
    ids = {new_run_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(is_run_id(run_id) for run_id in ids)


def test_an_event_id_parses_back() -> None:
    assert parse_event_id(event_id(RUN, 7)) == (RUN, 7)
    assert parse_event_id(f" {RUN}:0 ") == (RUN, 0)


@pytest.mark.parametrize(
    "text",
    ["", "7", f"{RUN}", f"{RUN}:", f"{RUN}:-1", f"{RUN}:07", f"{RUN}:1.5", f"{RUN.upper()}:1", f"{RUN}x:1",
     f"{RUN}:1:2", f"{RUN}:{'9' * 19}"],
)  # fmt: skip
def test_anything_else_is_not_an_event_id(text: str) -> None:
    assert parse_event_id(text) is None


def test_a_position_is_a_bare_seq_or_an_event_id_of_the_same_run() -> None:
    assert parse_position("12", RUN) == 12
    assert parse_position(f"{RUN}:12", RUN) == 12
    assert parse_position(f"{'f' * 32}:12", RUN) is None
    assert parse_position("twelve", RUN) is None
