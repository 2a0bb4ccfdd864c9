"""The relay's overhead: an engine's stream read directly vs through ``/falcon/run`` with FALCON_UPSTREAM.

Run from the repository root: ``python bench/bench_relay.py`` (about three minutes on 2 cores;
``--quick`` for a smaller run). Nothing is downloaded.

1. **Throughput and first token.** ``transformers serve`` runs a tiny random Falcon on the CPU
   (``tests/upstreams.py``); the example app runs under gunicorn's gevent worker with
   ``FALCON_UPSTREAM`` pointing at it. With the same prompt and greedy decoding of a fixed number
   of tokens, requests to the engine's own ``/v1/completions`` stream and to ``/falcon/run``
   alternate, read by ``requests`` in this process: tokens per second from sending the request to
   the last token (best of ``--repeats``; ``median_ratio`` is the median of the pairs), and the
   time to the first text (median of ``--ttft-runs`` one-token requests, each path).
2. **1,000 concurrent relayed streams on one worker.** ``transformers serve`` generates one
   request at a time, so a synthetic engine (``tests/relay_apps.py``: flask-sse-run streaming
   OpenAI chunks, one a second) stands in; 1,000 clients (``tests/sse_clients.py``, one thread)
   read ``/falcon/run`` through a freshly started front worker: failed streams, the gap between
   events (p99, max) and the front worker's peak memory increase per stream.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"

import requests  # noqa: E402

from flask_sse_run.testing import SSEParser  # noqa: E402
from tests.live import Server, gunicorn  # noqa: E402
from tests.sse_clients import run_streams  # noqa: E402
from tests.upstreams import save_engine_model, transformers_serve, wait_answering  # noqa: E402

PROMPT = "Tell me a story"
QUIET = {"GUNICORN_ACCESSLOG": "/dev/null", "GUNICORN_LOGLEVEL": "warning"}


def read_stream(response: requests.Response, started: float, relayed: bool) -> dict[str, float]:
    """Time to the first text, time to the last token, and the token count, of one stream."""
    parser = SSEParser()
    first = last = 0.0
    tokens = 0
    for chunk in response.raw.stream(65536, decode_content=True):
        now = time.perf_counter()
        for event in parser.feed(chunk):
            if event.data == "[DONE]":
                continue
            item = json.loads(event.data)
            if relayed:
                text = item.get("text", "")
                tokens = item.get("generated_tokens", tokens)
            else:
                text = "".join(c.get("text") or "" for c in item.get("choices") or ())
                tokens = (item.get("usage") or {}).get("completion_tokens", tokens)
            if text:
                first = first or now
                last = now
    return {"ttft": first - started, "elapsed": last - started, "tokens": tokens}


def direct(engine_url: str, tokens: int) -> dict[str, float]:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with requests.post(f"{engine_url}/v1/completions", json=body, stream=True, timeout=300) as response:
        return read_stream(response, started, relayed=False)


def relayed(front_url: str, tokens: int) -> dict[str, float]:
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0}
    headers = {"Accept-Encoding": "identity"}
    started = time.perf_counter()
    with requests.post(
        f"{front_url}/falcon/run", json=body, headers=headers, stream=True, timeout=300
    ) as response:
        return read_stream(response, started, relayed=True)


@contextmanager
def front(upstream: str, tmp: Path) -> Iterator[Server]:
    """The example app under gunicorn (one gevent worker) in front of ``upstream``."""
    env = {**QUIET, "FALCON_UPSTREAM": upstream, "FALCON_MODEL": ""}
    with gunicorn("wsgi:app", tmp_path=tmp, env=env) as server:
        wait_answering(f"{server.url}/falcon/health", server.process, server.log_path, 30)
        yield server


def overhead(tokens: int, repeats: int, ttft_runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = save_engine_model(tmp / "model", hidden_size=32, layers=2, heads=4)  # tiny_falcon "tiny"
        with transformers_serve(model, tmp) as engine, front(f"{engine.url}/v1", tmp) as server:
            direct(engine.url, 50), relayed(server.url, 50)  # warm-up
            pairs = []
            for _ in range(repeats):
                d, r = direct(engine.url, tokens), relayed(server.url, tokens)
                assert d["tokens"] == r["tokens"] == tokens, (d, r)  # greedy: no early EOS
                pairs.append((tokens / d["elapsed"], tokens / r["elapsed"]))
            ttfts = [
                (direct(engine.url, 1)["ttft"], relayed(server.url, 1)["ttft"]) for _ in range(ttft_runs)
            ]
    return {
        "direct_tps": max(d for d, _ in pairs),
        "relayed_tps": max(r for _, r in pairs),
        "median_ratio": statistics.median(r / d for d, r in pairs),
        "direct_ttft_ms": statistics.median(d for d, _ in ttfts) * 1000,
        "relayed_ttft_ms": statistics.median(r for _, r in ttfts) * 1000,
        "ttft_diff_ms": statistics.median(r - d for d, r in ttfts) * 1000,
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def worker_pid(server: Server) -> int:
    (pid,) = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    return int(pid)


def concurrent(clients: int, events: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with gunicorn("tests.relay_apps:engine_app()", tmp_path=tmp, env=QUIET) as engine:
            wait_answering(f"{engine.url}/v1/models", engine.process, engine.log_path, 30)
            with front(f"{engine.url}/v1", tmp) as server:
                body = {"prompt": PROMPT, "max_new_tokens": events, "temperature": 0}
                run_streams(
                    server.port, "/falcon/run", {**body, "max_new_tokens": 1}, 20, timeout=30
                )  # warm-up
                pid = worker_pid(server)
                before = peak = rss_kib(pid)
                done = threading.Event()

                def sample() -> None:
                    nonlocal peak
                    while not done.wait(0.25):
                        peak = max(peak, rss_kib(pid))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                results = run_streams(server.port, "/falcon/run", body, clients, timeout=events + 60)
                done.set()
                sampler.join()
                errors = server.log().count("Traceback")
    expected = events + 1  # the pieces and the summary
    ok = [r for r in results if r.status == 200 and r.complete and len(r.event_times) == expected]
    gaps = sorted(b - a for r in ok for a, b in itertools.pairwise(r.event_times))
    return {
        "failed": clients - len(ok),
        "gap_p99": gaps[int(0.99 * (len(gaps) - 1))] if gaps else float("nan"),
        "gap_max": gaps[-1] if gaps else float("nan"),
        "kib_per_stream": (peak - before) / clients,
        "tracebacks": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tokens, repeats and streams")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 clients, 2,000 sockets in the front
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs", flush=True)
    tokens, repeats, ttft_runs, clients = (300, 3, 10, 200) if args.quick else (1000, 5, 30, 1000)
    o = overhead(tokens, repeats, ttft_runs)
    print("measured the overhead", flush=True)
    c = concurrent(clients, events=10)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)\n")
    print("| measure | engine directly | through /falcon/run | ratio / difference |")
    print("| --- | --- | --- | --- |")
    print(
        f"| {tokens} tokens, greedy, tokens/s (best of {repeats}) | {o['direct_tps']:.0f} | "
        f"{o['relayed_tps']:.0f} | {o['relayed_tps'] / o['direct_tps']:.3f}x (median of pairs "
        f"{o['median_ratio']:.3f}x) |"
    )
    print(
        f"| time to first text, median of {ttft_runs}, ms | {o['direct_ttft_ms']:.2f} | "
        f"{o['relayed_ttft_ms']:.2f} | +{o['ttft_diff_ms']:.2f} ms (median of pairs) |"
    )
    print(f"| {clients:,} concurrent relayed streams, 10 events at 1/s: failed | | {c['failed']} | |")
    print(f"| ... gap between events p99 / max, s | | {c['gap_p99']:.3f} / {c['gap_max']:.3f} | |")
    print(f"| ... front worker memory per stream, KiB | | {c['kib_per_stream']:.1f} | |")
    print(f"| ... tracebacks in the front's log | | {c['tracebacks']} | |")


if __name__ == "__main__":
    main()
