from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from flask import Flask

from flask_sse_run import RegistrationError, SSERun


def test_init_app_stores_state_in_app_extensions() -> None:
    app = Flask(__name__)
    sse = SSERun(app)
    assert app.extensions["sse_run"].extension is sse


def test_registering_twice_on_one_app_raises() -> None:
    app = Flask(__name__)
    sse = SSERun(app)
    with pytest.raises(RuntimeError, match="already registered"):
        sse.init_app(app)
    with pytest.raises(RuntimeError, match="already registered"):
        SSERun(app)


def test_one_extension_serves_several_apps_and_functions_registered_after_init_app() -> None:
    sse = SSERun()

    @sse.function
    def before() -> Iterator[str]:
        yield "before"

    apps = [Flask(__name__), Flask(__name__)]
    for app in apps:
        sse.init_app(app)
    assert apps[0].test_client().post("/before").data == b"data: before\n\n"

    @sse.function(name="after")
    def registered_late() -> Iterator[str]:
        yield "after"

    for app in apps:
        assert app.test_client().post("/after").data == b"data: after\n\n"
        assert app.test_client().post("/registered_late").status_code == 404


def test_url_prefix_mounts_the_functions() -> None:
    app = Flask(__name__)
    sse = SSERun(app, url_prefix="/api/v1/")

    @sse.function
    def ping() -> Iterator[str]:
        yield "pong"

    client = app.test_client()
    assert client.post("/api/v1/ping").data == b"data: pong\n\n"
    assert client.post("/ping").status_code == 404


def prefixed_app() -> Flask:
    app = Flask(__name__)
    sse = SSERun(app, url_prefix="/api")

    @sse.function
    def run() -> Iterator[str]:
        yield "ran"

    @app.get("/api/health")
    def health() -> str:
        return "ok"

    return app


@pytest.mark.parametrize("path", ["/api/a/b", "/api/run/", "/api/run/extra", "/api/openapi.json/x"])
@pytest.mark.parametrize("method", ["POST", "GET", "OPTIONS", "TRACE"])
def test_other_paths_under_the_prefix_are_a_json_404(path: str, method: str) -> None:
    response = prefixed_app().test_client().open(path, method=method, headers={"X-Request-ID": "p-1"})
    assert response.status_code == 404
    assert response.content_type == "application/json"
    assert response.get_json() == {"error": "no such function"}
    assert response.headers["X-Request-ID"] == "p-1"


def test_methods_under_the_prefix_are_answered_in_json() -> None:
    client = prefixed_app().test_client()
    assert client.post("/api/run").data == b"data: ran\n\n"
    options = client.options("/api/run")
    assert options.status_code == 204 and options.headers["Allow"] == "OPTIONS, POST"
    trace = client.open("/api/run", method="TRACE")
    assert trace.status_code == 405 and trace.get_json() == {"error": "this endpoint accepts POST only"}


def test_the_apps_own_routes_under_the_prefix_still_win() -> None:
    assert prefixed_app().test_client().get("/api/health").data == b"ok"


def test_without_a_prefix_other_paths_keep_the_apps_own_404() -> None:
    app = Flask(__name__)
    sse = SSERun(app)
    sse.function(name="run")(lambda: "x")
    response = app.test_client().post("/run/extra")
    assert response.status_code == 404
    assert response.content_type.startswith("text/html")  # Flask's page: the app's 404 stands


def test_url_prefix_must_be_absolute() -> None:
    with pytest.raises(ValueError):
        SSERun(url_prefix="api")


def test_the_decorator_returns_the_function_unchanged() -> None:
    sse = SSERun()

    def f() -> None: ...

    assert sse.function(f) is f
    assert sse.function(name="g")(f) is f
    assert set(sse.functions) == {"f", "g"}


@pytest.mark.parametrize("name", ["_hidden", "bad name", "a/b"])
def test_private_and_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(RegistrationError):
        SSERun().function(name=name)(lambda: None)


def test_private_function_names_are_refused_by_default() -> None:
    sse = SSERun()

    def _private() -> None: ...

    with pytest.raises(RegistrationError, match="private"):
        sse.function(_private)


def test_async_functions_are_refused_at_registration() -> None:
    sse = SSERun()

    async def coroutine() -> str:
        return "never awaited"

    async def agen() -> AsyncIterator[str]:
        yield "never iterated"

    for func in (coroutine, agen):
        with pytest.raises(RegistrationError, match="async functions are not supported on WSGI"):
            sse.function(func)
    assert sse.functions == {}


def test_duplicate_names_are_refused() -> None:
    sse = SSERun()
    sse.function(name="x")(lambda: None)
    with pytest.raises(RegistrationError, match="already registered"):
        sse.function(name="x")(lambda: None)


def test_the_apps_own_routes_win_over_function_names() -> None:
    app = Flask(__name__)
    sse = SSERun(app)

    @app.post("/health")
    def health() -> str:
        return "app"

    @sse.function
    def other() -> str:
        return "fn"

    client = app.test_client()
    assert client.post("/health").data == b"app"
    assert client.post("/other").get_json()["result"] == "fn"


def test_a_second_instance_serves_its_own_functions_under_another_prefix() -> None:
    app = Flask(__name__)
    main, other = SSERun(app), SSERun(url_prefix="/falcon")

    @main.function(name="run")
    def main_run() -> Iterator[str]:
        yield "main"

    @other.function(name="run")
    def other_run() -> Iterator[str]:
        yield "other"

    other.init_app(app)
    client = app.test_client()
    assert client.post("/run").data == b"data: main\n\n"
    assert client.post("/falcon/run").data == b"data: other\n\n"
    assert app.extensions["sse_run"].extension is main  # the first instance's settings rule
    with pytest.raises(RuntimeError, match="already registered"):
        SSERun(app, url_prefix="/falcon/")
