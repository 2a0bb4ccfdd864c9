"""Start real gunicorn (gevent worker) on a free port for a test, and always stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group that ``process`` leads (started with ``start_new_session``),
    SIGKILL it if it is still there after 15 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def answers(port: int, timeout: float = 2.0) -> bool:
    """Whether an HTTP request to 127.0.0.1:``port`` gets a response (any status)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"GET /__ready__ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def wait_until_answering(server: Server, timeout: float) -> None:
    """Wait for a worker to answer a request, not for the master's socket: the master listens
    before any worker has booted (imported the app, loaded a model), and a test timed from a
    listening socket counts the worker's boot."""
    deadline = time.monotonic() + timeout
    while not answers(server.port):
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited at start-up:\n{server.log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn did not answer in time:\n{server.log()}")
        time.sleep(0.05)


@contextmanager
def gunicorn(
    app: str = "tests.apps:create_app()",
    *,
    tmp_path: Path,
    config: dict[str, Any] | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    startup_timeout: float = 30.0,
    cwd: Path = ROOT,
) -> Iterator[Server]:
    """Run ``gunicorn -c gunicorn.conf.py APP`` on 127.0.0.1 and a free port, from ``cwd``."""
    port = free_port()
    log = tmp_path / f"gunicorn-{port}.log"
    environment = {
        **os.environ,
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "PYTHONPATH": str(ROOT),
        "TEST_APP_CONFIG": json.dumps(config or {}),
        **(env or {}),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), *args, app],
            cwd=cwd,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the workers go when we kill it
        )
    server = Server(process, port, log)
    try:
        wait_until_answering(server, startup_timeout)
        yield server
    finally:
        stop_group(process)
