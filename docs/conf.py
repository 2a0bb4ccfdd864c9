"""Sphinx configuration of the flask-sse-run documentation.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (.ci/run does, warnings as errors).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

project = "flask-sse-run"
author = "the flask-sse-run developers"
copyright = "2026, the flask-sse-run developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "Plain Python generators as Server-Sent Events endpoints, for Flask."}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
