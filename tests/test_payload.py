from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest

from flask_sse_run.errors import RequestError, UnreadableBody
from flask_sse_run.payload import LARGE_BODY, read_json_object


def read(
    body: bytes, mimetype: str = "application/json", length: int | None = None, limit: int = 1000
) -> object:
    return read_json_object(io.BytesIO(body), mimetype, length, limit)


def test_reads_a_json_object() -> None:
    assert read(b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert read(b'{"a": 1}', "application/vnd.api+json") == {"a": 1}
    assert read(b'{"a": 1}', "Application/JSON; charset=utf-8") == {"a": 1}
    assert read(b'{"a": 1}', " application/json ;charset=utf-8") == {"a": 1}


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert read(b'{"a":' + b"[" * 63 + b"]" * 63 + b"}")


def test_surrogate_pairs_and_escaped_backslashes_are_not_lone_surrogates() -> None:
    assert read(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
    assert read(b'{"a": "\\\\ud800"}') == {"a": "\\ud800"}


def test_an_empty_body_means_no_arguments() -> None:
    assert read(b"", "") == {}
    assert read(b"  \n", "text/plain") == {}


@pytest.mark.parametrize(
    ("body", "mimetype", "length", "status", "fragment"),
    [
        (b"x" * 1001, "application/json", None, 413, "larger than 1000"),
        (b"{}", "application/json", 5000, 413, "larger than 1000"),
        (b"{}", "text/plain", None, 415, "application/json"),
        (b"{}", "text/plain; x=application/json", None, 415, "application/json"),
        (b"{}", "application/jsonp", None, 415, "application/json"),
        (b"{}", "", None, 415, "application/json"),
        (b"{", "application/json", None, 400, "not valid JSON"),
        (b'"a"', "application/json", None, 400, "JSON object"),
        (b"\xff", "application/json", None, 400, "UTF-8"),
        (b'{"a": NaN}', "application/json", None, 400, "NaN"),
        (b'{"a": -Infinity}', "application/json", None, 400, "-Infinity"),
        (b'{"a": 1, "a": 2}', "application/json", None, 400, "duplicate"),
        (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", None, 400, "nested"),
        (b'{"a":' + b"[" * 64 + b"]" * 64 + b"}", "application/json", None, 400, "nested deeper than 64"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "application/json", None, 400, "too large"),
        (b'{"a": 1e400}', "application/json", None, 400, "out of range"),
        (b'{"a": ["\\udc00"]}', "application/json", None, 400, "lone surrogate"),
    ],
    ids=lambda value: value[:20] if isinstance(value, bytes) else None,
)
def test_bad_bodies_are_rejected(
    body: bytes, mimetype: str, length: int | None, status: int, fragment: str
) -> None:
    with pytest.raises(RequestError) as info:
        read(body, mimetype, length, limit=1000 if status == 413 else 1_000_000)
    assert info.value.status == status
    assert fragment in info.value.message


def test_large_bodies_are_parsed_through_offload_and_small_ones_in_place() -> None:
    handed: list[int] = []

    def offload(parse: Callable[[bytes], dict[str, Any]], raw: bytes) -> dict[str, Any]:
        handed.append(len(raw))
        return parse(raw)

    small = b'{"a": 1}'
    large = b'{"a": "' + b"x" * LARGE_BODY + b'"}'
    assert read_json_object(io.BytesIO(small), "application/json", None, 1 << 20, offload=offload) == {"a": 1}
    assert read_json_object(io.BytesIO(large), "application/json", None, 1 << 20, offload=offload)["a"]
    assert handed == [len(large)]
    # Its refusals come back through it as they are.
    bad = b'{"a": 1, "a": 2, "pad": "' + b"x" * LARGE_BODY + b'"}'
    with pytest.raises(RequestError, match="duplicate key"):
        read_json_object(io.BytesIO(bad), "application/json", None, 1 << 20, offload=offload)


class _Broken:
    def read(self, size: int = -1, /) -> bytes:
        raise OSError("the server's reader gave up")


def test_a_body_the_server_cannot_read_is_a_400() -> None:
    with pytest.raises(UnreadableBody) as info:
        read_json_object(_Broken(), "application/json", None, 1000)
    assert info.value.status == 400 and info.value.reason == "OSError"
