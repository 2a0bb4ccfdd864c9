"""Streaming generation vs bare ``model.generate()``, on random Falcons, on this machine's CPU.

Run from the repository root: ``python bench/bench_llm.py`` (about ten minutes on 2 cores;
``--parts single``, ``sweep`` or ``parity`` runs one part).

**single** (about two minutes):
For each model (a tiny one, whose cost is all Python overhead, and a ~70M-parameter one, whose
cost is mostly matrix products) it measures, with the same prompt and greedy decoding of a fixed
number of tokens (``min_new_tokens``):

* bare ``model.generate()`` in this process: tokens/s from the call to its return, and the time
  to generate one token (the time to first token);
* ``POST /falcon/run`` of the example app under gunicorn's gevent worker, read by ``requests``:
  tokens/s from sending the request to the last event, the time to the first text event at
  the client, and the server's time to the first token (a byte-level BPE token may hold part of
  a character: the first text event can wait for the next tokens);
* the latency of ``GET /health`` polled every 10 ms during a generation (p50, p99, max).

Bare and streaming runs alternate, and the best of ``--repeats`` runs counts (other processes
on a shared machine only ever slow a run down); ``median_ratio`` is the median of the pairs.

**sweep**: 1, 2, 4, 8 and 16 simultaneous streams of ``--sweep-tokens`` (128) greedy tokens
each on the 70M model, against three servers started together and measured in turns (so
that the load of a shared machine, which drifts, weighs on all three alike; an idle server
costs nothing): the example app decoding the streams in one batch (the default), the same app
with ``FALCON_BATCHING=0`` (one ``generate()`` at a time: the serial path), and ``transformers
serve`` (Hugging Face's OpenAI-compatible server, ``/v1/completions`` with ``stream: true``;
for Falcon it runs one ``generate()`` at a time too). For each: the aggregate tokens/s (all
streams' tokens over the time from the first request to the last event), the time to each
stream's first text event (p50, p99 over ``--sweep-repeats`` runs) and each stream's own
tokens/s (median).

**parity**: in float32 (the CPU's dtype), how many of 8 greedy rows decoded together, joining
at different steps, produce other text than a lone ``generate()`` (in float64 none does; the
tests check that).

Nothing is downloaded: the models are built with random weights in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
# The servers' setting (flask_sse_run.llm.import_runtime), here too: the same OpenMP for all.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import requests  # noqa: E402

from bench.common import in_threads, percentile  # noqa: E402
from flask_sse_run.testing import SSEParser  # noqa: E402
from tests.latency import polled_latencies  # noqa: E402
from tests.live import Server, free_port, gunicorn, stop_group  # noqa: E402
from tests.tiny_falcon import save_model  # noqa: E402
from tests.upstreams import wait_answering  # noqa: E402

PROMPT = "Tell me a story"


class Bare:
    """``model.generate()`` called directly, in this process."""

    def __init__(self, directory: Path) -> None:
        import torch

        from flask_sse_run.llm import load_pretrained

        self.loaded = load_pretrained(str(directory), log=lambda line: None)
        self.ids = torch.tensor([self.loaded.tokenizer.encode(PROMPT)])

    def run(self, tokens: int) -> dict[str, float]:
        def seconds(n: int) -> float:
            began = time.perf_counter()
            model = self.loaded.model
            model.generate(input_ids=self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return time.perf_counter() - began

        return {"tokens_per_s": tokens / seconds(tokens), "ttft_ms": seconds(1) * 1000}


def stream(server: Server, tokens: int) -> dict[str, float]:
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": 0}
    parser, first, final = SSEParser(), None, None
    began = time.perf_counter()
    url, headers = f"{server.url}/falcon/run", {"Accept-Encoding": "identity"}
    with requests.post(url, json=body, headers=headers, stream=True, timeout=600) as response:
        for chunk in response.raw.stream(65536, decode_content=True):
            for event in parser.feed(chunk):
                data = json.loads(event.data)
                if first is None:
                    first = time.perf_counter()
                if "finish_reason" in data:
                    final = data
    ended = time.perf_counter()
    assert final is not None and final["generated_tokens"] == tokens, final
    assert first is not None
    return {
        "tokens_per_s": tokens / (ended - began),
        "ttft_ms": (first - began) * 1000,  # to the first text event, at the client
        "server_ttft_ms": final["time_to_first_token_ms"],  # to the first token, in the server
    }


def health_during(server: Server, tokens: int) -> dict[str, float]:
    with polled_latencies(f"{server.url}/health") as latencies:
        stream(server, tokens)
    ordered = sorted(latency * 1000 for latency in latencies)
    return {
        "requests": len(ordered),
        "p50_ms": statistics.median(ordered),
        "p99_ms": statistics.quantiles(ordered, n=100, method="inclusive")[98],
        "max_ms": ordered[-1],
    }


def bench(name: str, directory: Path, tokens: int, repeats: int, work: Path) -> dict[str, Any]:
    env = {"FALCON_MODEL": str(directory), "HF_HUB_OFFLINE": "1", "GUNICORN_ACCESSLOG": "/dev/null"}
    with gunicorn("wsgi:app", tmp_path=work, env=env, startup_timeout=60) as server:
        deadline = time.monotonic() + 300
        while requests.get(f"{server.url}/falcon/health", timeout=10).json()["status"] == "loading":
            if time.monotonic() > deadline:
                raise RuntimeError(server.log())
            time.sleep(0.2)
        bare = Bare(directory)
        print(f"[{name}] bare generate() and streaming, alternately ...", file=sys.stderr)
        bare.run(tokens), stream(server, tokens)  # warm-up
        # Alternate the two so that both see the same machine (other processes come and go).
        bares, streams = [], []
        for _ in range(repeats):
            bares.append(bare.run(tokens))
            time.sleep(0.5)  # one process's torch threads go idle before the other's work
            streams.append(stream(server, tokens))
            time.sleep(0.5)
        del bare
        print(f"[{name}] /health during a generation ...", file=sys.stderr)
        health = health_during(server, tokens)

    def best(runs: list[dict[str, float]], key: str) -> float:
        # Best of N: other processes on the machine only ever slow a run down.
        return max(run[key] for run in runs) if key == "tokens_per_s" else min(run[key] for run in runs)

    pairs = list(zip(bares, streams, strict=True))
    return {
        "model": name,
        "tokens": tokens,
        "bare_tokens_per_s": round(best(bares, "tokens_per_s"), 1),
        "stream_tokens_per_s": round(best(streams, "tokens_per_s"), 1),
        "ratio": round(best(streams, "tokens_per_s") / best(bares, "tokens_per_s"), 3),
        "median_ratio": round(statistics.median(s["tokens_per_s"] / b["tokens_per_s"] for b, s in pairs), 3),
        "bare_ttft_ms": round(best(bares, "ttft_ms"), 1),
        "stream_ttft_ms": round(best(streams, "ttft_ms"), 1),
        "server_ttft_ms": round(best(streams, "server_ttft_ms"), 1),
        "health_requests": health["requests"],
        "health_p50_ms": round(health["p50_ms"], 2),
        "health_p99_ms": round(health["p99_ms"], 2),
        "health_max_ms": round(health["max_ms"], 2),
    }


# -- the concurrency sweep ------------------------------------------------------------------

QUIET = {"HF_HUB_OFFLINE": "1", "GUNICORN_ACCESSLOG": "/dev/null"}


def read_sse(response: requests.Response, started: float, openai: bool) -> dict[str, float]:
    """One stream's times: first text event, last event, and its token count."""
    parser, first, last, tokens = SSEParser(), None, started, 0
    for chunk in response.raw.stream(65536, decode_content=True):
        now = time.perf_counter()
        for event in parser.feed(chunk):
            if event.data == "[DONE]":
                continue
            item = json.loads(event.data)
            if openai:
                text = "".join(choice.get("text") or "" for choice in item.get("choices") or ())
                tokens = (item.get("usage") or {}).get("completion_tokens", tokens)
            else:
                text = item.get("text", "")
                tokens = item.get("generated_tokens", tokens)
            if text and first is None:
                first = now
            last = now
    return {"started": started, "ttft": (first or last) - started, "ended": last, "tokens": tokens}


def falcon_stream(url: str, tokens: int) -> dict[str, float]:
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": 0}
    started = time.perf_counter()
    headers = {"Accept-Encoding": "identity"}
    with requests.post(f"{url}/falcon/run", json=body, headers=headers, stream=True, timeout=900) as response:
        return read_sse(response, started, openai=False)


def serve_stream(url: str, tokens: int) -> dict[str, float]:
    # generation_config fixes the length (min_new_tokens), as min_new_tokens does for the app.
    config = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    body = {"prompt": PROMPT, "stream": True, "generation_config": json.dumps(config)}
    started = time.perf_counter()
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=900) as response:
        return read_sse(response, started, openai=True)


def concurrently(stream: Callable[[], dict[str, float]], count: int) -> list[dict[str, float]]:
    """``count`` streams started together, each read by its own thread."""
    barrier = threading.Barrier(count)
    results: list[dict[str, float]] = [{} for _ in range(count)]

    def one(i: int) -> None:
        barrier.wait()
        results[i] = stream()

    in_threads(count, one)
    return results


def sweep(
    streams: dict[str, Callable[[], dict[str, float]]], counts: list[int], repeats: int
) -> list[dict[str, Any]]:
    """Each server at each stream count, the servers taking turns (load drifts hit all alike)."""
    measured: dict[tuple[str, int], dict[str, list[float]]] = {}
    for stream in streams.values():
        stream()  # warm-up
    for count in counts:
        for repeat in range(repeats):
            for name, stream in streams.items():
                print(f"[sweep] {name}: {count} streams ({repeat + 1}/{repeats}) ...", file=sys.stderr)
                results = concurrently(stream, count)
                began, ended = min(r["started"] for r in results), max(r["ended"] for r in results)
                into = measured.setdefault((name, count), {"aggregate": [], "ttft": [], "per_stream": []})
                into["aggregate"].append(sum(r["tokens"] for r in results) / (ended - began))
                into["ttft"] += [r["ttft"] * 1000 for r in results]
                into["per_stream"] += [r["tokens"] / (r["ended"] - r["started"]) for r in results]
    return [
        {
            "server": name,
            "streams": count,
            "aggregate_tokens_per_s": round(max(values["aggregate"]), 1),
            "ttft_p50_ms": round(statistics.median(values["ttft"]), 1),
            "ttft_p99_ms": round(percentile(values["ttft"], 99), 1),
            "per_stream_tokens_per_s": round(statistics.median(values["per_stream"]), 1),
        }
        for name in streams
        for count in counts
        for values in [measured[(name, count)]]
    ]


@contextmanager
def falcon_server(directory: Path, work: Path, **env: str) -> Iterator[Server]:
    with gunicorn("wsgi:app", tmp_path=work, env={"FALCON_MODEL": str(directory), **QUIET, **env}) as server:
        deadline = time.monotonic() + 300
        while requests.get(f"{server.url}/falcon/health", timeout=10).json()["status"] == "loading":
            if time.monotonic() > deadline:
                raise RuntimeError(server.log())
            time.sleep(0.2)
        yield server


@contextmanager
def transformers_serve(directory: Path, work: Path) -> Iterator[str]:
    """``transformers serve DIRECTORY`` on the CPU and a free port; its URL."""
    port = free_port()
    env = {
        **os.environ,
        **QUIET,
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(directory),
        "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with (work / f"serve-{port}.log").open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(f"{url}/v1/models", process, work / f"serve-{port}.log", timeout=300)
        yield url
    finally:
        stop_group(process)


def run_sweep(
    directory: Path, work: Path, tokens: int, counts: list[int], repeats: int
) -> list[dict[str, Any]]:
    """The three servers up together (idle ones cost nothing), measured in turns."""
    with contextlib.ExitStack() as stack:
        batched = stack.enter_context(falcon_server(directory, work, FALCON_MAX_QUEUE="64"))
        serial = stack.enter_context(
            falcon_server(directory, work, FALCON_BATCHING="0", FALCON_MAX_QUEUE="64")
        )
        streams = {
            "flask-sse-run batched": lambda: falcon_stream(batched.url, tokens),
            "flask-sse-run serial": lambda: falcon_stream(serial.url, tokens),
        }
        try:
            serve = stack.enter_context(transformers_serve(directory, work))
            streams["transformers serve"] = lambda: serve_stream(serve, tokens)
        except (ImportError, RuntimeError) as exc:  # no transformers[serving]: the others still count
            print(f"[sweep] transformers serve skipped: {exc}", file=sys.stderr)
        return sweep(streams, counts, repeats)


# -- greedy parity in float32 ----------------------------------------------------------------


def parity(directory: Path, tokens: int) -> dict[str, Any]:
    """How many of 8 greedy rows batched in float32 differ from a lone generate(), and where."""
    from flask_sse_run import thread_executor
    from flask_sse_run.llm import BatchScheduler, GenerationParams, load_pretrained
    from flask_sse_run.llm.generation import stream_text

    print("[parity] float32, 8 rows ...", file=sys.stderr)
    loaded = load_pretrained(str(directory), log=lambda line: None)
    executor = thread_executor(1)
    prompts = ["Tell me a story", "the café", "Once upon a time there was", "東京 and 北京", "a", "Zürich",
               "The quick brown fox jumps over the lazy dog", "€100"]  # fmt: skip
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0)

    def text(items: list[dict[str, Any]]) -> str:
        return "".join(item.get("text", "") for item in items)

    def lone(prompt: str) -> str:
        ids = loaded.tokenizer.encode(prompt)
        return text(list(stream_text(loaded.model, loaded.tokenizer, ids, params, executor=executor)))

    alone = [lone(prompt) for prompt in prompts]
    scheduler = BatchScheduler(loaded.model, loaded.tokenizer, executor=executor)
    batched: list[str] = [""] * len(prompts)
    joined = [threading.Event() for _ in prompts]

    def row(i: int) -> None:
        if i:
            joined[i - 1].wait()  # each row joins a few steps after the one before
        stream = scheduler.admit(loaded.tokenizer.encode(prompts[i]), params, started=0.0)
        items = []
        for item in stream:
            items.append(item)
            if len(items) == 3:
                joined[i].set()
        joined[i].set()
        batched[i] = text(items)

    in_threads(len(prompts), row)
    executor.shutdown()
    differing = [i for i, (a, b) in enumerate(zip(alone, batched, strict=True)) if a != b]
    first = [
        next((k for k, (x, y) in enumerate(zip(alone[i], batched[i], strict=False)) if x != y), None)
        for i in differing
    ]
    return {
        "rows": len(prompts),
        "tokens": tokens,
        "rows_differing": len(differing),
        "first_difference_at_char": first,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[column]) for column in columns))


def machine() -> str:
    load = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="single,sweep,parity", help="single,sweep,parity or a part")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny-tokens", type=int, default=2000)
    parser.add_argument("--70m-tokens", dest="big_tokens", type=int, default=200)
    parser.add_argument("--sweep-tokens", type=int, default=128)
    parser.add_argument("--sweep-streams", default="1,2,4,8,16")
    parser.add_argument("--sweep-repeats", type=int, default=2)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(f"machine at start: {machine()}", file=sys.stderr)
    report: dict[str, Any] = {"machine_at_start": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        big = save_model(work / "70m", tokenizer="bpe", size="70m")
        if "single" in parts:
            tiny = save_model(work / "tiny", tokenizer="word", size="tiny")
            results = [bench("tiny (24k params)", tiny, args.tiny_tokens, args.repeats, work)]
            results.append(bench("70M params", big, args.big_tokens, args.repeats, work))
            print_table(results)
            report["single"] = results
        if "sweep" in parts:
            counts = [int(count) for count in args.sweep_streams.split(",")]
            rows = run_sweep(big, work, args.sweep_tokens, counts, args.sweep_repeats)
            print_table(rows)
            report["sweep"] = rows
        if "parity" in parts:
            result = parity(big, args.sweep_tokens)
            print_table([result])
            report["parity_float32"] = result
    report["machine_at_end"] = machine()
    print(f"machine at end: {report['machine_at_end']}", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
