"""nginx in front of real gunicorn, running the configuration docs/deployment.md documents.

The ```nginx block of the page is read here and run as it is (only its two addresses are
replaced by free ports), in Debian's nginx with its own prefix, so the documentation and this
test cannot drift apart. A cut between nginx and gunicorn must reach a ``requests`` client (a
fetch-style client: it reads the body, and does not reconnect by itself) as an error, which the
documented ``proxy_http_version 1.1`` gives; without it nginx ends the client's response cleanly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_sse_run.testing import ServerSentEvent, SSEParser
from tests.live import ROOT, Server, answers, free_port, gunicorn, stop_group
from tests.tcp_proxy import cuttable_proxy

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
DOC = ROOT / "docs" / "deployment.md"
# The documented block's addresses, replaced by the test's.
DOC_UPSTREAM = "server 127.0.0.1:8000;"
DOC_LISTEN = "listen 80;"
# What the documentation says turns a cut into an error.
HTTP_1_1 = ("proxy_http_version 1.1;\n", 'proxy_set_header Connection "";\n')
CONFIG = {
    "SSE_RUN_END_EVENT": "done",
    "SSE_RUN_KEEPALIVE": 1,
    "SSE_RUN_RESUME_WINDOW": 10,
    "SSE_RUN_RESUME_TTL": 30,
}


def documented_config() -> str:
    """The one ```nginx block of docs/deployment.md, as it is there."""
    blocks = re.findall(r"^```nginx\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert len(blocks) == 1, "docs/deployment.md has one nginx block"
    return str(blocks[0])


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is in the documented block once"
    return text.replace(old, new)


def without_http_1_1(config: str) -> str:
    """The documented block as a stock ``proxy_pass`` has it: HTTP/1.0 to gunicorn."""
    for line in HTTP_1_1:
        config = re.sub(rf"^ *{re.escape(line)}", "", config, count=1, flags=re.M)
        assert line not in config
    return config


class Nginx:
    def __init__(self, process: subprocess.Popen[bytes], port: int, prefix: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.prefix = prefix

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def nginx(tmp_path: Path, upstream_port: int, site: str) -> Iterator[Nginx]:
    """nginx in the foreground with ``site`` (a block of the ``http`` context) proxying to
    127.0.0.1:``upstream_port``, everything it writes under ``tmp_path``; stopped by its pid."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"{NGINX} is missing (apt-get install nginx)")
    port = free_port()
    site = replace_once(site, DOC_UPSTREAM, f"server 127.0.0.1:{upstream_port};")
    site = replace_once(site, DOC_LISTEN, f"listen 127.0.0.1:{port};")
    prefix = tmp_path / f"nginx-{port}"
    prefix.mkdir()
    temp = {name: prefix / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    # As root, nginx's workers would become "nobody", who cannot enter pytest's private tmp.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log info;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n  access_log {prefix}/access.log;\n"
        + "".join(f"  {name}_temp_path {path};\n" for name, path in temp.items())
        + site
        + "}\n"
    )
    conf = prefix / "nginx.conf"
    conf.write_text(main)
    with (prefix / "stderr.log").open("wb") as out:
        process = subprocess.Popen(
            # -e: the log nginx writes before it has read the configuration, in the prefix too.
            [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Nginx(process, port, prefix)
    try:
        deadline = time.monotonic() + 20
        while not answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = (prefix / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"nginx did not start:\n{stderr}\n{server.error_log()}")
            time.sleep(0.05)
        yield server
    finally:
        stop_group(process)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with gunicorn(tmp_path=tmp_path_factory.mktemp("gunicorn"), config=CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(upstream: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with nginx(tmp_path_factory.mktemp("nginx"), upstream.port, documented_config()) as server:
        yield server


class Reader:
    """A fetch-style client: one ``requests`` stream, read as it comes, never reconnecting."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        headers = {"Accept": "text/event-stream", **kwargs.pop("headers", {})}
        self.response = requests.post(url, stream=True, timeout=20, headers=headers, **kwargs)
        self._chunks = self.response.iter_content(chunk_size=None)
        self._parser = SSEParser()
        self.events: list[tuple[float, ServerSentEvent]] = []

    def take(self, count: int) -> list[ServerSentEvent]:
        """Read until ``count`` events have come in all."""
        while len(self.events) < count:
            self._feed(next(self._chunks))
        return self.seen()

    def rest(self) -> list[ServerSentEvent]:
        """Read to the end; a cut raises (``requests.exceptions.ChunkedEncodingError``)."""
        try:
            for chunk in self._chunks:
                self._feed(chunk)
        finally:
            self.response.close()
        return self.seen()

    def seen(self) -> list[ServerSentEvent]:
        return [event for _, event in self.events]

    def _feed(self, chunk: bytes) -> None:
        now = time.monotonic()
        self.events.extend((now, event) for event in self._parser.feed(chunk))


def stats(server: Server) -> dict[str, Any]:
    return requests.get(f"{server.url}/stats", timeout=5).json()  # type: ignore[no-any-return]


def test_events_come_through_the_documented_nginx_one_by_one_as_they_are_made(proxy: Nginx) -> None:
    started = time.monotonic()
    reader = Reader(f"{proxy.url}/ticks", json={"n": 4, "interval": 0.8})
    events = reader.rest()
    assert reader.response.status_code == 200
    assert [event.event for event in events] == ["message"] * 4 + ["done"]
    # Each tick when it was made, 0.8 s apart: nginx buffering the stream would hand them over
    # together, at its end.
    times = [at - started for at, _ in reader.events]
    assert times[0] < 2.0, times
    assert times[3] - times[0] > 1.2, times


def test_a_run_resumes_through_the_documented_nginx_with_last_event_id(
    proxy: Nginx, upstream: Server
) -> None:
    before = stats(upstream)["resumable_started"]
    first = Reader(f"{proxy.url}/resumable_ticks", json={"n": 6, "interval": 0.3})
    taken = first.take(2)
    first.response.close()  # the client leaves; nginx closes its connection to gunicorn
    run_id = first.response.headers["X-Run-ID"]
    again = Reader(f"{proxy.url}/resumable_ticks", headers={"Last-Event-ID": taken[-1].id}, json={})
    assert again.response.headers["X-Run-ID"] == run_id
    rest = again.rest()
    assert [event.data for event in taken + rest[:-1]] == ["0", "1", "2", "3", "4", "5"]
    assert [event.id for event in rest[:-1]] == [f"{run_id}:{seq}" for seq in range(3, 7)]
    assert rest[-1].event == "done"
    # After the last event, the run's end: 204, through nginx too.
    done = requests.post(
        f"{proxy.url}/resumable_ticks", headers={"Last-Event-ID": rest[-1].id}, json={}, timeout=10
    )
    assert done.status_code == 204
    assert stats(upstream)["resumable_started"] == before + 1


def cut_mid_stream(url: str, cut: Any) -> tuple[Reader, BaseException | None]:
    """Start a run at ``url``, take two of its events, ``cut()``, and read on: what the client
    got, and the error it ended with (``None``: it saw a clean end)."""
    reader = Reader(f"{url}/resumable_ticks", json={"n": 8, "interval": 0.3})
    reader.take(2)
    cut()
    try:
        reader.rest()
    except requests.exceptions.ChunkedEncodingError as exc:
        return reader, exc
    return reader, None


@pytest.mark.parametrize("http_1_1", [True, False], ids=["documented", "without-http-1.1"])
def test_a_cut_between_nginx_and_gunicorn_reaches_the_client_as_an_error_and_the_run_resumes(
    upstream: Server, tmp_path: Path, http_1_1: bool
) -> None:
    config = documented_config() if http_1_1 else without_http_1_1(documented_config())
    with cuttable_proxy(upstream.port) as link, nginx(tmp_path, link.port, config) as proxy:
        reader, error = cut_mid_stream(proxy.url, link.cut)
        events = reader.seen()
        run_id = reader.response.headers["X-Run-ID"]
        if not http_1_1:
            # Why the documented lines are there: nginx took the cut for the stream's end, and
            # the client saw a clean end, short, without the end event.
            assert error is None, error
            assert 2 <= len(events) < 8 and all(event.event == "message" for event in events)
            return
        assert error is not None, "the cut stream ended cleanly"
        assert "done" not in [event.event for event in events]
        # The client resumes the same run through nginx, from the last event it got.
        again = Reader(f"{proxy.url}/resumable_ticks", headers={"Last-Event-ID": events[-1].id}, json={})
        rest = again.rest()
    assert again.response.headers["X-Run-ID"] == run_id
    assert [event.data for event in events + rest[:-1]] == [str(i) for i in range(8)]
    assert rest[-1].event == "done"


def test_a_killed_worker_behind_the_documented_nginx_reaches_the_client_as_an_error(tmp_path: Path) -> None:
    with (
        gunicorn(tmp_path=tmp_path, config=CONFIG) as upstream,
        nginx(tmp_path, upstream.port, documented_config()) as proxy,
    ):
        worker = stats(upstream)["pid"]
        reader, error = cut_mid_stream(proxy.url, lambda: os.kill(worker, signal.SIGKILL))
        log = proxy.error_log()
    assert error is not None, "the stream of a killed worker ended cleanly"
    assert 2 <= len(reader.seen()) < 8
    assert "upstream prematurely closed connection" in log
