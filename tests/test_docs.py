"""The documentation's examples run, so that they cannot rot: every ```python block of README.md
and docs/*.md has a check here (a new block without one fails), the `curl` call of the README
prints what the README says, and the getting-started page, where the site's links to "command 1"
go, restates the README's commands. The site itself is built by .ci/run (warnings as errors).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from flask_sse_run.channels.names import channel_run_id
from flask_sse_run.testing import stream_events
from tests.channel_followers import follow_client, follow_url, taken
from tests.live import ROOT, Server, gunicorn
from tests.redis_server import RedisServer
from tests.tcp_proxy import cuttable_proxy

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    """``(where, code)`` of every python block: where is ``file:first line of code``."""
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            code = textwrap.dedent(match.group(2))
            blocks.append((f"{path.name}:{code.strip().splitlines()[0][:40]}", code))
    return blocks


def run_block(code: str, preamble: str = "", replace: dict[str, str] | None = None) -> dict[str, Any]:
    """Execute ``preamble`` then the block in one fresh namespace; return the namespace."""
    for old, new in (replace or {}).items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(textwrap.dedent(preamble) + code, "<docs example>", "exec"), namespace)
    return namespace


APP_PREAMBLE = """
from flask import Flask
from flask_sse_run import SSERun
app = Flask(__name__)
sse = SSERun(app)
"""

# --- one check per block --------------------------------------------------------------------------


def check_ten_line_app(code: str, tmp_path: Path) -> None:
    app = run_block(code)["app"]
    events = stream_events(app.test_client(), "/run", json={"upper_range": 2})
    assert [event.data for event in events] == ["Number 0 ", "Number 1 "]


def check_requests_client(code: str, tmp_path: Path) -> None:
    with gunicorn("wsgi:app", tmp_path=tmp_path) as server:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_block(code, replace={"http://127.0.0.1:8000": server.url})
    assert out.getvalue().splitlines() == ["Number 0 ", "Number 1 ", "Number 2 "]


def check_client_through_a_cut(library: str) -> Callable[[str, Path], None]:
    """The check of a client example of docs/clients.md: run against the example app through a
    proxy that cuts the connection mid-run, it prints every number once, in order, having
    reconnected with the id of the last event it got."""

    def check(code: str, tmp_path: Path) -> None:
        pytest.importorskip(library)  # imported now: the cut is timed from the request
        upper_range = 4  # one event a second: the cut, 1.5 s in, comes after two of them
        with gunicorn("wsgi:app", tmp_path=tmp_path) as server, cuttable_proxy(server.port) as proxy:

            def cut_mid_run() -> None:
                deadline = time.monotonic() + 30
                while proxy.connections == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(1.5)
                proxy.cut()

            cutter = threading.Thread(target=cut_mid_run, daemon=True)
            cutter.start()
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                run_block(
                    code,
                    replace={
                        "upper_range=3": f"upper_range={upper_range}",
                        "http://127.0.0.1:8000": proxy.url,
                    },
                )
            cutter.join(timeout=30)
            sent = b"".join(proxy.requests()).decode("latin-1")
        assert out.getvalue().splitlines() == [f"Number {i} " for i in range(upper_range)]
        resumed = re.findall(r"(?i)\r\nlast-event-id: [0-9a-f]{32}:(\d+)\r\n", sent)
        assert resumed and int(resumed[0]) < upper_range, sent  # a reconnect mid-run, after the cut

    return check


def check_jwt_auth(code: str, tmp_path: Path) -> None:
    secret = "s" * 32
    os.environ["JWT_SECRET"] = secret
    try:
        namespace = run_block(
            code, "import os, flask\nfrom flask import Flask\nfrom flask_sse_run import SSERun\n"
            "app = Flask(__name__)\nsse = SSERun()\n",
        )  # fmt: skip
    finally:
        del os.environ["JWT_SECRET"]
    app = namespace["app"]
    namespace["sse"].init_app(app)
    token = jwt.encode({"sub": "ann", "aud": "counting-api", "exp": int(time.time()) + 60}, secret)
    client = app.test_client()
    assert client.post("/whoami").status_code == 401
    events = stream_events(client, "/whoami", headers={"Authorization": f"Bearer {token}"})
    assert [event.data for event in events] == ["ann"]


def check_blueprint(code: str, tmp_path: Path) -> None:
    app = run_block(code, "from flask import Flask\napp = Flask(__name__)\napp.secret_key = 'k'\n")["app"]
    client = app.test_client()
    assert client.post("/api/run", json={"upper_range": 1}).status_code == 401  # the hook refuses
    assert client.options("/api/run").status_code == 204  # preflights pass the hook
    with client.session_transaction() as session:
        session["user_id"] = 1
    assert client.post("/api/run", json={"upper_range": 1}).status_code == 200


def check_cors(code: str, tmp_path: Path) -> None:
    preamble = APP_PREAMBLE.replace("SSERun(app)", 'SSERun(app, url_prefix="/api")') + (
        "@sse.function\ndef run(n: int):\n    yield n\n"
    )
    app = run_block(code, preamble)["app"]
    origin = {"Origin": "https://app.example.com"}
    preflight = app.test_client().options(
        "/api/run",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "last-event-id",
        },
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "last-event-id" in preflight.headers["Access-Control-Allow-Headers"].lower()
    streamed = app.test_client().post("/api/run", json={"n": 1}, headers=origin)
    assert "X-Request-ID" in streamed.headers["Access-Control-Expose-Headers"]


def check_gunicorn_settings(code: str, tmp_path: Path) -> None:
    # The lines the docs say matter are this repository's gunicorn.conf.py's own.
    namespace = run_block(code)
    conf = run_block((ROOT / "gunicorn.conf.py").read_text())
    for name in ("worker_class", "worker_connections", "backlog"):
        assert namespace[name] == conf[name], name
    assert callable(namespace["post_worker_init"])


def check_llm_in_your_app(code: str, tmp_path: Path) -> None:
    from tests.tiny_falcon import save_model

    model = save_model(tmp_path / "model")
    namespace = run_block(code, "from flask import Flask\napp = Flask(__name__)\n",
                          replace={'"tiiuae/falcon-7b-instruct"': repr(str(model))})  # fmt: skip
    llm = namespace["llm"]
    llm.start()  # what the docs say gunicorn's hook does (else the first request gets a 503)
    deadline = time.monotonic() + 120
    while llm.health()["status"] != "ready":
        assert time.monotonic() < deadline, llm.health()
        time.sleep(0.1)
    body = {"prompt": "Tell me a story", "max_new_tokens": 4}
    events = stream_events(namespace["app"].test_client(), "/generate", json=body)
    assert json.loads(events[-1].data)["generated_tokens"] >= 1
    assert all("text" in json.loads(event.data) for event in events[:-1])


def check_threads(code: str, tmp_path: Path) -> None:
    app = run_block(code, APP_PREAMBLE + "expensive_step = lambda i: i * i\n")["app"]
    events = stream_events(app.test_client(), "/crunch", json={"n": 4})
    assert [event.data for event in events] == ["0", "1", "4", "9"]


def check_relay(code: str, tmp_path: Path) -> None:
    env = {"TEST_APP_CONFIG": json.dumps({"ENGINE_INTERVAL": 0.01})}
    with gunicorn("tests.relay_apps:engine_app()", tmp_path=tmp_path, env=env) as engine:
        url = f"{engine.url}/v1/completions"
        app = run_block(code, "from flask import Flask\napp = Flask(__name__)\n",
                        replace={"http://engine:8000/v1/completions": url})["app"]  # fmt: skip
        events = stream_events(app.test_client(), "/story", json={"prompt": "once", "max_tokens": 3})
    texts = [json.loads(event.data)["choices"][0]["text"] for event in events if event.data.startswith("{")]
    assert "".join(texts).startswith(" tok0 tok1 tok2")


def check_resumable_decorator(code: str, tmp_path: Path) -> None:
    namespace = run_block(code, APP_PREAMBLE)
    registered = namespace["sse"].functions["run"]
    assert registered.resumable is True and registered.methods == ("GET", "POST")


def check_testing_helpers(code: str, tmp_path: Path) -> None:
    app = run_block(DOCS_BLOCKS["README.md:import time"])["app"]
    namespace = run_block(code)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        with app.test_client() as client:
            test(client)


def check_falcon_blueprint(code: str, tmp_path: Path) -> None:
    app = run_block(code, "from flask import Flask\napp = Flask(__name__)\n")["app"]
    client = app.test_client()
    health = client.get("/falcon/health")
    assert health.status_code == 503 and "FALCON_MODEL" in health.get_json()["message"]  # no model here
    assert client.get("/falcon/v1/models").status_code == 200
    assert client.post("/falcon/run", json={"prompt": "x"}).status_code == 503


@contextlib.contextmanager
def falcon_server(tmp_path: Path) -> Iterator[Server]:
    """The example app under gunicorn with a tiny Falcon from a local directory, no
    ``FALCON_OPENAI_MODEL``: the model is listed by its path, a name the examples must ask for."""
    from tests.tiny_falcon import save_model

    model = save_model(tmp_path / "model", tokenizer="bpe")
    env = {"FALCON_MODEL": str(model), "HF_HUB_OFFLINE": "1"}
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as server:
        deadline = time.monotonic() + 120
        while requests.get(f"{server.url}/falcon/health", timeout=10).json()["status"] != "ready":
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        yield server


def check_openai_client(code: str, tmp_path: Path) -> None:
    with falcon_server(tmp_path) as server:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_block(code, replace={"http://127.0.0.1:8000": server.url, "max_tokens=200": "max_tokens=5"})
    assert "completion_tokens=5" in out.getvalue()  # the usage chunk, after the text


def check_langchain(code: str, tmp_path: Path) -> None:
    with falcon_server(tmp_path) as server:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_block(code, replace={"http://127.0.0.1:8000": server.url, "max_tokens=200": "max_tokens=5"})
    assert out.getvalue().strip()  # the streamed text


def check_openai_routes_in_your_app(code: str, tmp_path: Path) -> None:
    from tests.tiny_falcon import save_model

    model = save_model(tmp_path / "model")
    namespace = run_block(code, "from flask import Flask\napp = Flask(__name__)\n",
                          replace={'"tiiuae/falcon-7b-instruct"': repr(str(model))})  # fmt: skip
    llm = namespace["llm"]
    llm.start()
    deadline = time.monotonic() + 120
    while llm.health()["status"] != "ready":
        assert time.monotonic() < deadline, llm.health()
        time.sleep(0.1)
    body = {"model": "falcon-7b", "prompt": "Tell me a story", "max_tokens": 3}
    answer = namespace["app"].test_client().post("/v1/completions", json=body)
    assert answer.status_code == 200 and answer.get_json()["usage"]["completion_tokens"] == 3


def check_redis_cluster(code: str, tmp_path: Path) -> None:
    import redis

    from tests.redis_server import RedisCluster

    with RedisCluster(tmp_path) as cluster:
        preamble = "from flask import Flask\napp = Flask(__name__)\n"
        app = run_block(code, preamble, replace={"redis://10.0.0.5:6379/0": cluster.nodes[1].url})["app"]
        from flask_sse_run import SSERun

        sse = SSERun(app)

        @sse.function(resumable=True)
        def count(n: int) -> Iterator[int]:
            yield from range(n)

        events = stream_events(app.test_client(), "/count", json={"n": 3})
        assert [event.data for event in events] == ["0", "1", "2"]
        run_id = events[0].id.split(":")[0]
        key = f"sse-run:run:{{{run_id}}}"
        holders = [
            node.port for node in cluster.nodes if redis.Redis.from_url(node.url).keys(key) == [key.encode()]
        ]
        assert len(holders) == 1  # the run lives on one node of the cluster
        app.extensions["sse_run"].runs.store.close()


# --- docs/channels.md -----------------------------------------------------------------------------
# The followers of tests/channel_followers.py read the channel streams.


def check_channel_publish_from_a_view(code: str, tmp_path: Path) -> None:
    app = run_block(code, APP_PREAMBLE)["app"]
    client = app.test_client()
    found = follow_client(client, "/channels/orders", 2)
    answers = [client.post(f"/orders/{order}/pay").get_json() for order in (7, 8)]
    assert answers == [{"id": 7, "event": "orders:1"}, {"id": 8, "event": "orders:2"}]
    assert [(e.event, e.id, json.loads(e.data)) for e in taken(found, 2)] == [
        ("order", "orders:1", {"id": 7, "status": "paid"}),
        ("order", "orders:2", {"id": 8, "status": "paid"}),
    ]


def check_channel_publish_from_a_generator(code: str, tmp_path: Path) -> None:
    app = run_block(code, APP_PREAMBLE)["app"]
    client = app.test_client()
    found = follow_client(client, "/channels/imports", 3)
    steps = ["read", "check", "save"]
    assert [event.data for event in stream_events(client, "/import_file", json={"name": "a.csv"})] == steps
    assert [(e.event, e.id, json.loads(e.data)) for e in taken(found, 3)] == [
        ("message", f"imports:{seq}", {"file": "a.csv", "step": step}) for seq, step in enumerate(steps, 1)
    ]


# The app of the channels page's other processes: its channels in the Redis of REDIS_URL (in
# each process's memory without it).
MYAPP = """
import os
from flask import Flask
from flask_sse_run import SSERun

sse = SSERun()


def create_app():
    app = Flask(__name__)
    app.config["SSE_RUN_REDIS_URL"] = os.environ.get("REDIS_URL")
    sse.init_app(app)
    return app
"""


def redis_myapp(url: str) -> Any:
    """MYAPP's app, made here, on the Redis at ``url``."""
    os.environ["REDIS_URL"] = url
    try:
        return run_block(MYAPP)["create_app"]()
    finally:
        del os.environ["REDIS_URL"]


def check_channel_publish_from_a_job(code: str, tmp_path: Path) -> None:
    # The job runs in a process of its own, as an RQ worker would run it, and reaches a client
    # of gunicorn's worker through Redis.
    project = tmp_path / "project"
    project.mkdir()
    (project / "myapp.py").write_text(MYAPP)
    (project / "jobs.py").write_text(code)
    with RedisServer(tmp_path) as redis_server:
        env = {"REDIS_URL": redis_server.url, "PYTHONPATH": f"{project}{os.pathsep}{ROOT}"}
        with gunicorn("myapp:create_app()", tmp_path=tmp_path, cwd=project, env=env) as server:
            found = follow_url(f"{server.url}/channels/user:42", 1)
            job = subprocess.run(
                [sys.executable, "-c", "import jobs; jobs.thumbnail_ready(42, 7)"],
                cwd=project, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert job.returncode == 0, job.stderr
            (event,) = taken(found, 1)
    assert (event.event, event.id, json.loads(event.data)) == (
        "image",
        "user:42:1",
        {"image": 7, "status": "ready"},
    )


def check_channel_history(code: str, tmp_path: Path) -> None:
    import redis

    with RedisServer(tmp_path) as redis_server:
        app = run_block(
            code,
            "from flask import Flask\napp = Flask(__name__)\n",
            replace={"redis://10.0.0.5:6379/0": redis_server.url, "HISTORY=1000": "HISTORY=3"},
        )["app"]
        from flask_sse_run import SSERun

        sse = SSERun(app)
        client = app.test_client()
        try:
            with app.app_context():
                assert [sse.publish("news", f"n{seq}") for seq in range(1, 6)][-1] == "news:5"
            live = follow_client(client, "/channels/news", 1)
            with app.app_context():
                sse.publish("news", "n6")
            assert [event.data for event in taken(live, 1)] == ["n6"]
            # The channel keeps its last 3 events, for 600 s after the last publish.
            key = f"sse-run:run:{{{channel_run_id('news')}}}"
            server = redis.Redis.from_url(redis_server.url)
            assert server.xlen(f"{key}:events") == 3
            assert all(590 <= server.ttl(k) <= 600 for k in (key, f"{key}:events"))
            # A client back from seq 1: seqs 2 and 3 are gone, it is told so, then gets 4 to 6.
            resumed = taken(
                follow_client(client, "/channels/news", 4, headers={"Last-Event-ID": "news:1"}), 4
            )
            assert [(e.event, e.id, e.data) for e in resumed] == [
                ("missed", "news:3", '{"channel":"news","missed":2}'),
                ("message", "news:4", "n4"),
                ("message", "news:5", "n5"),
                ("message", "news:6", "n6"),
            ]
        finally:
            app.extensions["sse_run"].runs.store.close()


def _jwt_app(code: str) -> tuple[Any, str]:
    secret = "s" * 32
    preamble = f"from flask import Flask\nfrom flask_sse_run import SSERun\napp = Flask(__name__)\n" \
        f"app.config['SSE_RUN_JWT_KEY'] = {secret!r}\nsse = SSERun(app)\n"  # fmt: skip
    return run_block(code, preamble), secret


def check_channel_auth_by_subject(code: str, tmp_path: Path) -> None:
    namespace, secret = _jwt_app(code)
    app, sse = namespace["app"], namespace["sse"]
    token = jwt.encode({"sub": "42", "exp": int(time.time()) + 60}, secret)
    auth = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    assert client.get("/channels/news").status_code == 401
    refused = client.get("/channels/user:43", headers=auth)
    assert (refused.status_code, refused.get_json()) == (403, {"error": "not allowed to read this channel"})
    refused = client.get("/channels?channel=news&channel=user:43", headers=auth)
    assert refused.get_json() == {"error": "not allowed to read channel #2 of the request"}
    found = follow_client(client, "/channels?channel=news&channel=user:42", 2, headers=auth)
    # One after the other: two channels' events published at once may come in either order (each
    # channel's own come in order).
    with app.app_context():
        sse.publish("user:42", "yours")
    assert [(e.id, e.data) for e in taken(found, 1)] == [("news:0,user:42:1", "yours")]
    with app.app_context():
        sse.publish("news", "everyone's")
    assert [(e.id, e.data) for e in taken(found, 1)] == [("news:1,user:42:1", "everyone's")]


def check_channel_auth_by_session(code: str, tmp_path: Path) -> None:
    app = run_block(code, APP_PREAMBLE + "app.secret_key = 'k'\n")["app"]
    client = app.test_client()
    assert [client.get(f"/channels/{name}").status_code for name in ("news", "user:1")] == [403, 403]
    with client.session_transaction() as session:
        session["user_id"] = 1
    assert client.get("/channels/user:2").status_code == 403
    for name in ("news", "user:1"):
        response = client.get(f"/channels/{name}", buffered=False)
        assert response.status_code == 200
        response.close()


def _channels_page() -> str:
    return (ROOT / "docs" / "channels.md").read_text()


def test_the_channels_pages_publish_commands_print_what_it_shows_and_refuse_without_redis(
    tmp_path: Path,
) -> None:
    text = _channels_page()
    block = re.search(r"```console\n(\$ flask --app myapp sse publish .*?)```", text, re.S)
    assert block is not None
    calls = re.findall(r"^\$ (.*)\n(.*)\n", block.group(1), re.M)
    assert len(calls) == 2
    project = tmp_path / "project"
    project.mkdir()
    (project / "myapp.py").write_text(MYAPP)
    env = {**os.environ, "PYTHONPATH": f"{project}{os.pathsep}{ROOT}"}
    env.pop("REDIS_URL", None)

    def run(command: str, **more: str) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", *shlex.split(command)]
        return subprocess.run(
            args, cwd=project, env={**env, **more}, capture_output=True, text=True, timeout=60
        )

    with RedisServer(tmp_path) as redis_server:
        for command, printed in calls:
            done = run(command, REDIS_URL=redis_server.url)
            assert (done.returncode, done.stdout, done.stderr) == (0, f"{printed}\n", "")
        app = redis_myapp(redis_server.url)
        try:
            stored = app.extensions["sse_run"].runs.store.read(channel_run_id("orders"), 0, 10)
        finally:
            app.extensions["sse_run"].runs.store.close()
    assert stored is not None
    assert stored.events == [(1, b'id: orders:1\nevent: order\ndata: {"id":7,"status":"shipped"}\n\n')]
    # Without Redis: the refusal the page quotes.
    refusal = re.search(r"`(Error: this app keeps[^`]*)`", text)
    assert refusal is not None
    refused = run(calls[0][0])
    assert refused.returncode == 1
    assert " ".join(refused.stderr.split()) == " ".join(refusal.group(1).split())


def test_the_channels_pages_stream_of_two_channels_is_what_curl_prints(tmp_path: Path) -> None:
    text = _channels_page()
    shown = re.search(r"```console\n\$ (curl -N '[^']*channels\?[^']*')\n(.*?)```", text, re.S)
    assert shown is not None
    project = tmp_path / "project"
    project.mkdir()
    (project / "myapp.py").write_text(MYAPP)
    with RedisServer(tmp_path) as redis_server:
        env = {"REDIS_URL": redis_server.url, "PYTHONPATH": f"{project}{os.pathsep}{ROOT}"}
        publisher = redis_myapp(redis_server.url)
        sse = publisher.extensions["sse_run"].extension
        with gunicorn("myapp:create_app()", tmp_path=tmp_path, cwd=project, env=env) as server:
            with publisher.app_context():
                for seq in range(1, 4):
                    sse.publish("news", f"earlier news {seq}")  # before the request: not sent
            url = shown.group(1).split("'")[1].replace("http://127.0.0.1:8000", server.url)
            curl = subprocess.Popen(
                ["curl", "-sS", "-N", "--max-time", "5", url], stdout=subprocess.PIPE, text=True
            )
            try:
                assert curl.stdout is not None
                first = curl.stdout.readline()  # the stream has started: the client follows both
                with publisher.app_context():
                    sse.publish("news", "The new version is out")
                    sse.publish("user:42", {"image": 7, "status": "ready"}, event="image")
                out = first + curl.stdout.read()  # to curl's end, its --max-time at most
                curl.wait(timeout=30)
            finally:
                curl.kill()
        publisher.extensions["sse_run"].runs.store.close()
    assert out == shown.group(2)


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "resumable-runs.md:app.config.update(": check_redis_cluster,
    "falcon.md:from flask_sse_run.llm import falcon_blu": check_falcon_blueprint,
    "openai.md:from openai import OpenAI": check_openai_client,
    "openai.md:from langchain_openai import ChatOpenAI": check_langchain,
    "openai.md:from flask_sse_run import SSERun": check_openai_routes_in_your_app,
    "README.md:import time": check_ten_line_app,
    "clients.md:from datetime import timedelta": check_client_through_a_cut("requests_sse"),
    "clients.md:import httpx": check_client_through_a_cut("httpx_sse"),
    "clients.md:import asyncio": check_client_through_a_cut("aiohttp_sse_client"),
    'authentication.md:app.config["SSE_RUN_JWT_KEY"] = os.envir': check_jwt_auth,
    "blueprints.md:from flask import Blueprint, abort, requ": check_blueprint,
    "blueprints.md:from flask_cors import CORS": check_cors,
    'deployment.md:worker_class = "gevent"': check_gunicorn_settings,
    "falcon.md:from flask_sse_run import SSERun": check_llm_in_your_app,
    "getting-started.md:import requests": check_requests_client,
    "getting-started.md:import time": check_ten_line_app,
    "long-running-work.md:from flask_sse_run import disconnected, ": check_threads,
    "relay.md:from flask_sse_run import SSERun, open_s": check_relay,
    'resumable-runs.md:@sse.function(resumable=True, methods=("': check_resumable_decorator,
    "testing.md:from flask_sse_run.testing import Server": check_testing_helpers,
    'channels.md:@app.post("/orders/<int:order_id>/pay")': check_channel_publish_from_a_view,
    "channels.md:@sse.function": check_channel_publish_from_a_generator,
    "channels.md:# jobs.py: the functions an RQ worker ru": check_channel_publish_from_a_job,
    "channels.md:app.config.update(": check_channel_history,
    "channels.md:@sse.channel_auth": check_channel_auth_by_subject,
    "channels.md:from flask import session": check_channel_auth_by_session,
}
DOCS_BLOCKS = dict(python_blocks())


def test_every_python_block_of_the_docs_has_a_check() -> None:
    assert sorted(DOCS_BLOCKS) == sorted(CHECKS), set(DOCS_BLOCKS) ^ set(CHECKS)


@pytest.mark.parametrize("where", sorted(CHECKS))
def test_the_docs_python_example_runs(where: str, tmp_path: Path) -> None:
    CHECKS[where](DOCS_BLOCKS[where], tmp_path)


def _curl_blocks() -> Iterator[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    for match in re.finditer(r"```console\n\$ (curl (?:.*\\\n)*.*)\n((?:.|\n)*?)```", text):
        yield match.group(1).replace("\\\n", " "), match.group(2)


def test_the_readmes_curl_call_prints_what_the_readme_shows(tmp_path: Path) -> None:
    ((command, expected),) = list(_curl_blocks())
    project = tmp_path / "project"
    project.mkdir()
    (project / "yourmodule.py").write_text(DOCS_BLOCKS["README.md:import time"])
    with gunicorn("yourmodule:app", tmp_path=tmp_path, cwd=project, env={"PYTHONPATH": str(ROOT)}) as server:
        out = _curl(command, server)
    assert out == expected


def test_the_example_apps_output_in_the_readme_is_the_resumable_runs(tmp_path: Path) -> None:
    # The README shows the example app's output for the same curl call: ids of one run.
    text = (ROOT / "README.md").read_text()
    shown = re.search(r"the same `curl` prints:\n\n```console\n(.*?)```", text, re.S)
    assert shown is not None
    ((command, _),) = list(_curl_blocks())
    with gunicorn("wsgi:app", tmp_path=tmp_path) as server:
        out = _curl(command, server)
    run_id = re.search(r"id: ([0-9a-f]{32}):1", out)
    assert run_id is not None
    shown_id = re.search(r"id: ([0-9a-f]{32}):1", shown.group(1))
    assert shown_id is not None
    assert out == shown.group(1).replace(shown_id.group(1), run_id.group(1))


def test_the_readmes_commands_are_the_getting_started_pages() -> None:
    # The docs pages link "command 1" to the getting-started page (the site does not include the
    # README): it restates the README's set-up and install commands, word for word.
    def bash_blocks(path: Path) -> list[str]:
        return re.findall(r"```bash\n.*?```", path.read_text(), re.S)

    readme = bash_blocks(ROOT / "README.md")
    assert len(readme) == 3 and readme[0].startswith("```bash\n# 1. ")
    assert bash_blocks(ROOT / "docs" / "getting-started.md")[:3] == readme


def test_the_wheel_the_readme_installs_is_the_one_setup_py_builds() -> None:
    version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text())
    assert version is not None
    assert f"dist/flask_sse_run-{version.group(1)}-py3-none-any.whl" in (ROOT / "README.md").read_text()


def test_the_openai_curl_example_names_the_model_the_server_lists() -> None:
    text = (ROOT / "docs" / "openai.md").read_text()
    listed = re.search(r"\$ curl -s \S+/falcon/v1/models\n(.*)\n", text)
    requested = re.search(r"\$ curl -N \S+/falcon/v1/chat/completions .*?--data '(.*?)'", text, re.S)
    assert listed is not None and requested is not None
    assert json.loads(requested.group(1))["model"] == json.loads(listed.group(1))["data"][0]["id"]


def _curl(command: str, server: Server) -> str:
    # The README's words, the shell's quotes undone, against the test's server.
    parts = re.findall(r"'[^']*'|\S+", command)[1:]
    args = ["curl", "-sS", *[part.strip("'").replace("http://127.0.0.1:8000", server.url) for part in parts]]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout
