"""The example page: ``GET /`` streams ``run`` (and Falcon, when ready) in the browser, and
follows the channel ``notifications`` (its button publishes with ``POST /notify``).

Plain HTML, CSS and JavaScript in ``static/`` (no build step, nothing from a CDN), served at
``GET /`` and ``/page/<file>``. Every URL the page calls is relative to it, so the page works
behind a proxy that mounts the app under a path.
"""

from __future__ import annotations

from flask import Blueprint, Response

__all__ = ["page"]

# Its own URL for the files: the app's /static/ route may point elsewhere (a test app).
page = Blueprint("page", __name__, static_folder="static", static_url_path="/page")


@page.get("/")
def index() -> Response:
    """The page itself."""
    return page.send_static_file("index.html")
