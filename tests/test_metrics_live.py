"""Metrics under real gunicorn: two gevent workers in one scrape (prometheus_client's multiprocess
mode through gunicorn.conf.py's hooks), a worker killed and replaced, workers recycled by
max_requests, and the gevent body's counts."""

from __future__ import annotations

import gzip
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.live import Server, gunicorn

APP = "tests.observed_app:create_app()"
METRICS = {"SSE_RUN_METRICS": True}


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(f"{server.url}/metrics", timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def streams(found: dict[Any, float], function: str, end: str) -> float:
    return found.get(("sse_run_streams_total", (("end", end), ("function", function))), 0.0)


def wait_for(condition: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


class PidStream:
    """A long stream whose first event says which worker serves it; open until closed."""

    def __init__(self, server: Server) -> None:
        self.response = requests.post(
            f"{server.url}/pid", json={"n": 1000, "interval": 1.0}, stream=True, timeout=30,
            headers={"Connection": "close", "Accept-Encoding": "identity"},
        )  # fmt: skip
        # Kept: a line iterator dropped half-read closes the connection.
        self.lines = self.response.iter_lines()
        self.pid = int(next(self.lines).removeprefix(b"data: "))

    def close(self) -> None:
        self.response.close()


def serving_pid(server: Server) -> int:
    body = requests.post(f"{server.url}/pid", json={"n": 1}, timeout=10, headers={"Connection": "close"}).text
    return int(body.removeprefix("data: "))


def wait_for_workers(server: Server, count: int) -> None:
    """Until ``count`` workers have booted and answer (the first one answers before the second has
    loaded the app, and takes every connection meanwhile)."""
    wait_for(lambda: server.log().count("Booting worker") >= count)
    seen: set[int] = set()
    wait_for(lambda: seen.add(serving_pid(server)) or len(seen) >= count)


def db_pids(directory: Path) -> set[str]:
    return {m.group(1) for name in os.listdir(directory) if (m := re.search(r"_(\d+)\.db$", name))}


def test_two_workers_counts_meet_in_one_scrape_and_a_killed_worker_leaves_no_live_gauge(
    tmp_path: Path,
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left by an earlier server")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "GUNICORN_WORKERS": "2"}
    with gunicorn(APP, tmp_path=tmp_path, config=METRICS, env=env) as srv:
        assert "counter_1.db" not in os.listdir(metrics_dir)  # emptied at start
        wait_for_workers(srv, 2)
        warm_up = scrape(srv)  # the requests that found both workers
        # Long streams, until each worker holds at least two.
        open_streams: dict[int, list[PidStream]] = {}
        for _ in range(40):
            stream = PidStream(srv)
            open_streams.setdefault(stream.pid, []).append(stream)
            if len(open_streams) == 2 and all(len(held) >= 2 for held in open_streams.values()):
                break
        assert len(open_streams) == 2, "one worker took every connection"
        # Short streams, finished, on both workers.
        finished: Counter[int] = Counter()
        for _ in range(60):
            body = requests.post(
                f"{srv.url}/pid", json={"n": 3}, timeout=10, headers={"Connection": "close"}
            ).text  # fmt: skip
            finished[int(body.split("\n")[0].removeprefix("data: "))] += 1
            if len(finished) == 2 and sum(finished.values()) >= 6:
                break
        assert set(finished) == set(open_streams)
        done = sum(finished.values())
        found = scrape(srv)
        assert found[("sse_run_streams_active", ())] == sum(map(len, open_streams.values()))
        done += streams(warm_up, "pid", "complete")
        events = 3 * sum(finished.values()) + streams(warm_up, "pid", "complete")
        assert streams(found, "pid", "complete") == done
        assert found[("sse_run_events_total", (("function", "pid"),))] == events

        # SIGKILL one worker: no child of its can say goodbye; gunicorn replaces it.
        victim, survivor = sorted(open_streams, key=lambda pid: len(open_streams[pid]))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: srv.log().count("Booting worker") >= 3)
        wait_for(lambda: not (metrics_dir / f"gauge_livesum_{victim}.db").exists())
        for stream in open_streams.pop(victim):
            stream.close()
        found = scrape(srv)
        # Only the survivor's streams are open; the dead worker's finished ones still count.
        assert found[("sse_run_streams_active", ())] == len(open_streams[survivor])
        assert streams(found, "pid", "complete") == done
        assert found[("sse_run_events_total", (("function", "pid"),))] == events
        assert str(victim) not in db_pids(metrics_dir)  # its files were merged, not left
        assert "counter_archive.db" in os.listdir(metrics_dir)

        for stream in open_streams[survivor]:
            stream.close()
        found = wait_for(lambda: (f := scrape(srv))[("sse_run_streams_active", ())] == 0 and f)
        assert streams(found, "pid", "disconnect") == len(open_streams[survivor])


def test_workers_recycled_by_max_requests_leave_their_counts_and_not_their_files(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "GUNICORN_WORKERS": "2"}
    with gunicorn(APP, tmp_path=tmp_path, config=METRICS, env=env, args=("--max-requests", "3")) as srv:
        # A worker stops accepting within a second of its last request: paced requests, so that
        # workers really are recycled every few requests.
        workers, requests_made = set(), 0
        deadline = time.monotonic() + 60
        while len(workers) < 8:
            assert time.monotonic() < deadline, workers
            workers.add(serving_pid(srv))
            requests_made += 1
            if requests_made % 5 == 0:
                scrape(srv)  # each scrape merges the workers that died since the last one
            time.sleep(0.2)
        time.sleep(2)  # the last recycled workers' exits reach the master
        scrape(srv)
        found = scrape(srv)
        assert streams(found, "pid", "complete") == requests_made
        assert found[("sse_run_events_total", (("function", "pid"),))] == requests_made
        assert len(db_pids(metrics_dir)) <= 4  # the live two, and at most two that died just now


def test_without_prometheus_client_gunicorn_conf_still_serves_and_replaces_workers(tmp_path: Path) -> None:
    # An environment where prometheus_client cannot be imported (what Python does for a module
    # that is not installed), with PROMETHEUS_MULTIPROC_DIR set anyway: the hooks do nothing.
    blocked = tmp_path / "blocked"
    (blocked / "prometheus_client").mkdir(parents=True)
    (blocked / "prometheus_client" / "__init__.py").write_text("raise ImportError('not installed')\n")
    root = Path(__file__).resolve().parent.parent
    env = {"PYTHONPATH": f"{blocked}:{root}", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    with gunicorn(APP, tmp_path=tmp_path, env=env) as srv:
        stream = PidStream(srv)
        os.kill(stream.pid, signal.SIGKILL)
        wait_for(lambda: srv.log().count("Booting worker") >= 2)
        wait_for(lambda: requests.post(f"{srv.url}/pid", json={"n": 1}, timeout=10).ok)
        assert requests.get(f"{srv.url}/metrics", timeout=10).status_code == 404  # metrics are off
        assert "Exception in worker process" not in srv.log() and "Traceback" not in srv.log()


def test_the_gevent_body_counts_events_and_bytes_exactly(tmp_path: Path) -> None:
    # One worker, no PROMETHEUS_MULTIPROC_DIR: the worker's own registry. Events go out in
    # batches (up to 64 a write), with pings between slow ones, gzipped or not.
    config = {**METRICS, "SSE_RUN_KEEPALIVE": 0.2}
    with gunicorn(APP, tmp_path=tmp_path, config=config) as srv:
        identity = requests.post(
            f"{srv.url}/pid", json={"n": 5000}, headers={"Accept-Encoding": "identity"}, timeout=30
        ).content
        zipped = requests.post(
            f"{srv.url}/pid", json={"n": 5000}, headers={"Accept-Encoding": "gzip"}, stream=True
        )
        compressed = zipped.raw.read(decode_content=False)
        assert gzip.decompress(compressed).count(b"\n\n") == 5000
        slow = requests.post(
            f"{srv.url}/pid",
            json={"n": 2, "interval": 1.0},
            headers={"Accept-Encoding": "identity"},
            timeout=30,
        ).content
        assert b": ping" in slow
        found = scrape(srv)
    assert streams(found, "pid", "complete") == 3
    assert found[("sse_run_events_total", (("function", "pid"),))] == 10002  # pings are no events
    assert found[("sse_run_bytes_total", (("function", "pid"),))] == len(identity) + len(compressed) + len(
        slow
    )
    assert found[("sse_run_first_event_seconds_count", (("function", "pid"),))] == 3
    assert found[("sse_run_stream_duration_seconds_count", (("function", "pid"),))] == 3
    assert found[("sse_run_stream_duration_seconds_bucket", (("function", "pid"), ("le", "0.5")))] == 2


def test_a_falcon_generation_shows_up_in_the_llm_metrics(tmp_path: Path) -> None:
    import json

    import pytest

    pytest.importorskip("torch")
    from flask_sse_run.testing import SSEParser
    from tests.tiny_falcon import save_model

    model = save_model(tmp_path / "falcon")
    env = {
        "FALCON_MODEL": str(model),
        "HF_HUB_OFFLINE": "1",
        "EXAMPLE_SSE_RUN_METRICS": "true",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }

    def llm(found: dict[Any, float], name: str) -> float:
        return found.get((f"sse_run_llm_{name}", ()), 0.0)

    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as srv:
        health = f"{srv.url}/falcon/health"
        wait_for(lambda: requests.get(health, timeout=5).json()["status"] == "ready", timeout=90)
        body = {"prompt": "Tell me a story", "max_new_tokens": 30, "min_new_tokens": 30}
        summary = requests.post(f"{srv.url}/falcon/run", json=body, timeout=60).text.split("data: ")[-1]
        assert json.loads(summary)["generated_tokens"] == 30
        found = scrape(srv)
        assert llm(found, "tokens_total") == 30
        for histogram in ("queue_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds"):
            assert llm(found, f"{histogram}_count") == 1, histogram
        assert llm(found, "time_to_first_token_seconds_sum") > 0
        assert llm(found, "batch_rows") == 0
        # An OpenAI stream is a stream of the extension's: counted by its route.
        stream = {"model": str(model), "prompt": "Tell me a story", "max_tokens": 3, "stream": True}
        assert requests.post(f"{srv.url}/falcon/v1/completions", json=stream, timeout=60).text.endswith(
            "[DONE]\n\n"
        )
        assert streams(scrape(srv), "falcon/v1/completions", "complete") == 1

        # A long one: its row is in the batch while it runs; DELETE stops it.
        long = {"prompt": "Tell me a story", "max_new_tokens": 2000, "min_new_tokens": 2000}
        identity = {"Accept-Encoding": "identity"}
        url = f"{srv.url}/falcon/run"
        response = requests.post(url, json=long, headers=identity, stream=True, timeout=60)
        parser, received = SSEParser(), []
        for chunk in response.raw.stream(1024):
            received.extend(parser.feed(chunk))
            if len(received) >= 5:
                break
        assert llm(scrape(srv), "batch_rows") == 1
        requests.delete(f"{srv.url}/falcon/runs/{response.headers['X-Run-ID']}", timeout=10)
        response.close()
        last = wait_for(
            lambda: (
                (h := requests.get(health, timeout=5).json())["last_generation"]["finish_reason"]
                == "cancelled"
                and h
            )
        )
        found = wait_for(lambda: (f := scrape(srv)) and llm(f, "batch_rows") == 0 and f)
    cancelled = last["last_generation"]
    assert cancelled["finish_reason"] == "cancelled"
    assert llm(found, "tokens_total") == 30 + 3 + cancelled["generated_tokens"]
    assert llm(found, "tokens_after_cancel_total") == cancelled["tokens_after_cancel"] <= 1
    assert llm(found, "time_to_first_token_seconds_count") == 3
