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
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start-up:\n{server.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not listen in time:\n{server.log()}") from None
                time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
