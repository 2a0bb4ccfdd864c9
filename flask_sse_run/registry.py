"""What the extension keeps per app and every view reads: the import-free middle of the package.

The extension (:mod:`.extension`) makes these; the views (:mod:`.views`, :mod:`.runs.responses`,
:mod:`.openapi`, the OpenAI routes) and the routing (:mod:`.routing`) read them from
``app.extensions[EXTENSION_KEY]``. None of them imports the extension, so the extension imports
them all and nothing imports back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .auth import Authenticator
    from .binding import Binder
    from .config import Settings
    from .runs.runtime import Runs
    from .stream_record import Observers

__all__ = ["APP_ENDPOINTS", "EXTENSION_KEY", "Mount", "RegisteredFunction", "Served", "State"]

#: Where an app keeps the extension's :class:`State`: ``app.extensions["sse_run"]``.
EXTENSION_KEY = "sse_run"
#: The endpoint names' start for an instance mounted on the app itself (``sse_run.call``).
APP_ENDPOINTS = "sse_run."


@dataclass(frozen=True)
class RegisteredFunction:
    """A served function and its inspected parameters."""

    func: Callable[..., Any]
    binder: Binder
    #: Served without a bearer token even when auth is on.
    public: bool = False
    #: A generator function: calling it runs none of its code, so there is nothing to watch.
    generator: bool = False
    #: The HTTP methods it is served with (``GET`` binds the query string).
    methods: tuple[str, ...] = ("POST",)
    #: Its streams are resumable runs; ``None``: as ``SSE_RUN_RESUMABLE`` says.
    resumable: bool | None = None

    @property
    def allow(self) -> str:
        """The ``Allow`` header of its URL."""
        return ", ".join(sorted({*self.methods, "OPTIONS"}))


@dataclass(frozen=True)
class State:
    """What the extension keeps per app, in ``app.extensions["sse_run"]``."""

    #: The first instance registered; it read the settings.
    extension: Served
    settings: Settings
    #: The app's resumable runs and their store.
    runs: Runs
    #: ``None`` when auth is off.
    auth: Authenticator | None = None
    #: Every place an instance serves the app (on it, or through a blueprint's registration),
    #: each under its own prefix, in the order they were added.
    mounts: list[Mount] = field(default_factory=list)
    #: Who is told of each stream (metrics, the trace, the log); ``None``: no one.
    observers: Observers | None = None


class Served(Protocol):
    """What a mount needs of the instance it serves (an :class:`~flask_sse_run.SSERun`)."""

    @property
    def url_prefix(self) -> str:
        """The instance's own URL prefix."""

    @property
    def functions(self) -> Mapping[str, RegisteredFunction]:
        """Its registered functions, by name."""

    @property
    def channel_authorizer(self) -> Callable[[str, str | None], bool] | None:
        """Who may read a channel, or ``None``."""


@dataclass(frozen=True)
class Mount:
    """One place an instance is served on an app."""

    extension: Served
    #: The rules' prefix as Werkzeug reads it: a blueprint's ``url_prefix`` (``<variables>``
    #: included), then the instance's own ``url_prefix``; ``""`` at the root.
    url_prefix: str
    #: The start of its endpoint names: :data:`APP_ENDPOINTS` or :func:`blueprint_endpoints`.
    endpoints: str = APP_ENDPOINTS
    #: The blueprint registration's subdomain (``None``: any host the app serves).
    subdomain: str | None = None

    def endpoint(self, kind: str) -> str:
        """The endpoint of its ``call``, ``openapi``, ``runs``, ``channel``, ``channels`` or
        ``unknown`` rule."""
        # The instance's own prefix keeps two instances on one blueprint apart; a dot in it would
        # change what Flask takes for the blueprint's name.
        own = self.extension.url_prefix
        return f"{self.endpoints}{kind}{own if self.endpoints == APP_ENDPOINTS else own.replace('.', '_')}"
