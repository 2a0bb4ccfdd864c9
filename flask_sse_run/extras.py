"""The error for a module whose optional dependency is not installed: it names the extra.

A module of an extra imports its dependency at the top, as usual; this turns the bare
``No module named 'torch'`` into what to run. The package itself (``import flask_sse_run``)
never imports such a module, so the core install never meets it.
"""

from __future__ import annotations

__all__ = ["missing_extra"]


def missing_extra(extra: str, error: ImportError) -> ImportError:
    """An :class:`ImportError` saying which extra installs what ``error`` did not find."""
    missing = error.name or str(error)
    return ImportError(
        f"{missing} is not installed: this module needs the {extra} extra: "
        f"pip install 'flask-sse-run[{extra}]' (from a checkout: pip install -e '.[{extra}]')",
        name=error.name,
    )
