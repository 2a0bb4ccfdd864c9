from __future__ import annotations

import pytest

from flask_sse_run.docstrings import parameter_docs


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            "Summary.\n\nArgs:\n    a (int): first.\n    b: second,\n        continued.\n\n"
            "Returns:\n    c: no.",
            {"a": "first.", "b": "second, continued."},
        ),
        (
            "Summary.\n\n:param a: first.\n:param int b: second,\n    continued.\n:returns: no.",
            {"a": "first.", "b": "second, continued."},
        ),
        (
            "Summary.\n\nParameters\n----------\na : int\n    first.\nb\n    second,\n    continued.\n\n"
            "Returns\n-------\nc\n    no.",
            {"a": "first.", "b": "second, continued."},
        ),
        ("Summary only.", {}),
        (None, {}),
    ],
    ids=["google", "sphinx", "numpy", "none", "no-docstring"],
)
def test_parameter_descriptions_are_parsed_from_docstrings(doc: str | None, expected: dict[str, str]) -> None:
    assert parameter_docs(doc) == expected
