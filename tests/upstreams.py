"""Real upstreams for the relay tests: ``transformers serve`` on a tiny Falcon, a server that
trickles its response headers, and helpers.

``transformers serve`` (transformers >= 5.24, ``pip install 'transformers[serving]'``) is started
as ``python -m transformers.cli.transformers serve MODEL_DIR --device cpu --host 127.0.0.1
--port PORT``: the positional model is ``force_model``, loaded before the server listens and
used for every request; ``--device cpu`` keeps it off any GPU. ``HF_HUB_OFFLINE=1`` keeps it from
the network (a local directory needs none) and ``HF_HUB_DISABLE_UPDATE_CHECK=1`` stops the CLI's
once-a-day PyPI version check. It runs in its own process group, is ready when it answers
``GET /v1/models``, and is killed by that group's id.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.live import ROOT, Server, free_port, stop_group


class Upstream(Server):
    """A started server: its process, URL and log, and how to kill it and read its CPU time."""

    def kill(self) -> None:
        """SIGKILL the server's process group (no goodbye: sockets are cut as they are)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def cpu_seconds(self) -> float:
        """CPU time the server's process has used so far (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_answering(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Return once ``GET url`` answers 200; raise with the log if the server exits or is late."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited at start-up:\n{log.read_text(errors='replace')}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer in time:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


@contextmanager
def transformers_serve(model_dir: Path, tmp_path: Path, startup_timeout: float = 120.0) -> Iterator[Upstream]:
    """``transformers serve`` for ``model_dir`` on 127.0.0.1 and a free port, on the CPU."""
    port = free_port()
    log = tmp_path / f"transformers-serve-{port}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "CUDA_VISIBLE_DEVICES": "",
        # One torch thread: a tiny model gains nothing from more, and on a shared machine
        # torch's spinning worker threads made a 300-token run take 0.6 to 9.6 s.
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--log-level", "info",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    upstream = Upstream(process, port, log)
    try:
        wait_answering(f"{upstream.url}/v1/models", process, log, startup_timeout)
        yield upstream
    finally:
        stop_group(process)


def wait_idle(upstream: Upstream, timeout: float) -> float:
    """Seconds until the server used under 5% of a core over a 0.5 s window; raise after ``timeout``."""
    started = time.monotonic()
    before = upstream.cpu_seconds()
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = upstream.cpu_seconds()
        if now - before < 0.025:
            return time.monotonic() - started
        before = now
    raise AssertionError(f"the upstream was still computing {timeout} s later")


def save_engine_model(directory: Path, *, hidden_size: int = 512, layers: int = 8, heads: int = 8) -> Path:
    """A random Falcon for ``transformers serve``: byte-level BPE, 40,000 tokens of context.

    The default size (22M parameters, 40 to 80 tokens/s on one core here) makes a 2048-token
    generation last long enough that a test can tell an aborted one from one run to its end;
    the benchmark asks for Falcon-7B's architecture at ``tests/tiny_falcon.py``'s tiny size.
    BPE because transformers' stop strings (``StopStringCriteria.clean_tokenizer_vocab``) fail
    on the WordLevel test tokenizer ("substring not found": its vocabulary has no token for the
    probe text "abcdef"). ``do_sample`` in its generation config because ``transformers serve``
    samples only when the model's config says so: a request's ``temperature`` above 0 alone
    does not turn sampling on.
    """
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    from tests.tiny_falcon import EOS, byte_bpe_tokenizer, never_ends

    tokenizer = byte_bpe_tokenizer()
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = FalconConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=40_000,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = FalconForCausalLM(config)
    never_ends(model, eos)
    model.generation_config.do_sample = True
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class TrickledHeaders:
    """What :func:`trickling_headers` saw: when each connection was closed by its client."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.closed_at: list[float] = []  # time.monotonic() of each close seen


@contextmanager
def trickling_headers(interval: float = 0.5, lines: int = 30) -> Iterator[TrickledHeaders]:
    """A server on 127.0.0.1 that answers every request with ``200 OK`` and then one header line
    every ``interval`` seconds, ``lines`` of them, before an empty event stream: a byte always
    comes well within any read timeout, the headers take ``interval * lines`` seconds. It notes
    when the client closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = TrickledHeaders(f"http://127.0.0.1:{listener.getsockname()[1]}")
    stopped = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(interval)
            try:
                conn.recv(65536)  # the request; its content does not matter
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for i in range(lines):
                    if stopped.is_set():
                        return
                    try:
                        if conn.recv(1) == b"":  # the client closed its end
                            seen.closed_at.append(time.monotonic())
                            return
                    except TimeoutError:
                        pass  # nothing from the client: still there
                    conn.sendall(b"X-Trickle-%d: x\r\n" % i)
                conn.sendall(b"Content-Type: text/event-stream\r\nContent-Length: 0\r\n\r\n")
            except OSError:  # reset by the client
                seen.closed_at.append(time.monotonic())

    def accept() -> None:
        while not stopped.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield seen
    finally:
        stopped.set()
        listener.close()
        acceptor.join(timeout=5)
