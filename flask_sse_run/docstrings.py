"""Per-parameter descriptions read from a function's docstring, for the OpenAPI document.

Three common styles are understood: Google (an ``Args:`` section), Sphinx (``:param name:``
lines) and NumPy (an underlined ``Parameters`` section). Anything else yields no descriptions;
this is documentation, so a docstring it cannot read is never an error.
"""

from __future__ import annotations

import inspect
import re

__all__ = ["parameter_docs"]

_GOOGLE_SECTION = re.compile(r"(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments):\Z")
_GOOGLE_ITEM = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)\Z")
_SPHINX_ITEM = re.compile(r":param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)\Z")
_NUMPY_ITEM = re.compile(r"(\w+)\s*(?::.*)?\Z")


def parameter_docs(doc: str | None) -> dict[str, str]:
    """Per-parameter descriptions from a docstring (Google, Sphinx or NumPy style).

    Continuation lines are joined with spaces; a parameter that is not described is left out.
    """
    if not doc:
        return {}
    lines = [(len(line) - len(line.lstrip()), line.strip()) for line in inspect.cleandoc(doc).splitlines()]
    found: dict[str, list[str]] = {}
    for style in (_sphinx_items, _google_items, _numpy_items):
        style(lines, found)
    return {name: " ".join(parts) for name, parts in found.items() if any(parts)}


_Lines = list[tuple[int, str]]


def _sphinx_items(lines: _Lines, found: dict[str, list[str]]) -> None:
    current: list[str] | None = None
    for indent, text in lines:
        item = _SPHINX_ITEM.match(text)
        if item:
            current = found.setdefault(item.group(1), [])
            current.append(item.group(2))
        elif current is not None and text and indent > 0 and not text.startswith(":"):
            current.append(text)
        else:
            current = None


def _google_items(lines: _Lines, found: dict[str, list[str]]) -> None:
    current: list[str] | None = None
    item_indent: int | None = None
    in_section = False
    for indent, text in lines:
        if indent == 0 and text:
            in_section = bool(_GOOGLE_SECTION.match(text))
            current, item_indent = None, None
            continue
        if not in_section or not text:
            continue
        if item_indent is None:
            item_indent = indent
        item = _GOOGLE_ITEM.match(text) if indent == item_indent else None
        if item:
            current = found.setdefault(item.group(1), [])
            current.append(item.group(2))
        elif current is not None and indent > item_indent:
            current.append(text)


def _numpy_items(lines: _Lines, found: dict[str, list[str]]) -> None:
    current: list[str] | None = None
    in_section = False
    for index, (indent, text) in enumerate(lines):
        underlined = (
            index + 1 < len(lines) and bool(lines[index + 1][1]) and set(lines[index + 1][1]) == {"-"}
        )
        if indent == 0 and underlined:  # a section title
            in_section, current = text in ("Parameters", "Other Parameters"), None
            continue
        if not in_section or not text or set(text) == {"-"}:
            continue
        item = _NUMPY_ITEM.match(text) if indent == 0 else None
        if item:
            current = found.setdefault(item.group(1), [])
        elif current is not None and indent > 0:
            current.append(text)
