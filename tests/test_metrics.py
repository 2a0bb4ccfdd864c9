"""Prometheus metrics in one process (Flask's test client), the LLM metrics, and the multiprocess
directory's housekeeping with files written by real processes (gunicorn itself: test_metrics_live)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from flask_sse_run import ConfigurationError
from flask_sse_run.metrics import llm_metrics, metrics_view
from flask_sse_run.metrics_files import compact, scrape_lock
from tests.live import ROOT
from tests.observed_app import create_app


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(client: Any, path: str = "/metrics") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get(path)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    return samples(response.get_data(as_text=True))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


@pytest.fixture
def app() -> Flask:
    return create_app(TESTING=True, SSE_RUN_METRICS=True)


def test_a_finished_stream_is_counted_with_its_events_bytes_and_times(app: Flask) -> None:
    before = {
        "streams": value("sse_run_streams_total", function="pid", end="complete"),
        "events": value("sse_run_events_total", function="pid"),
        "bytes": value("sse_run_bytes_total", function="pid"),
        "durations": value("sse_run_stream_duration_seconds_count", function="pid"),
        "first": value("sse_run_first_event_seconds_count", function="pid"),
        "active": value("sse_run_streams_active"),
    }
    body = app.test_client().post("/pid", json={"n": 4}).get_data()
    assert value("sse_run_streams_total", function="pid", end="complete") == before["streams"] + 1
    assert value("sse_run_events_total", function="pid") == before["events"] + 4
    assert value("sse_run_bytes_total", function="pid") == before["bytes"] + len(body)
    assert value("sse_run_stream_duration_seconds_count", function="pid") == before["durations"] + 1
    assert value("sse_run_first_event_seconds_count", function="pid") == before["first"] + 1
    assert value("sse_run_streams_active") == before["active"]


def test_an_open_stream_is_active_until_it_ends(app: Flask) -> None:
    before = value("sse_run_streams_active")
    disconnects = value("sse_run_streams_total", function="pid", end="disconnect")
    response = app.test_client().post("/pid", json={"n": 100, "interval": 0.01}, buffered=False)
    next(iter(response.response))
    assert value("sse_run_streams_active") == before + 1
    response.close()
    assert value("sse_run_streams_active") == before
    assert value("sse_run_streams_total", function="pid", end="disconnect") == disconnects + 1


def test_errors_are_counted_as_error_ends(app: Flask) -> None:
    before = value("sse_run_streams_total", function="fail", end="error")
    app.test_client().post("/fail", json={"n": 1}).get_data()
    assert value("sse_run_streams_total", function="fail", end="error") == before + 1


def test_refusals_are_counted_by_status_but_not_the_apps_own_pages(app: Flask) -> None:
    client = app.test_client()
    before = {status: value("sse_run_refused_total", status=status) for status in ("404", "405", "422")}
    assert client.post("/pid", json={"n": "many"}).status_code == 422
    assert client.post("/nope", json={}).status_code == 404
    assert client.put("/pid").status_code == 405
    assert client.get("/a/b").status_code == 404  # the app's own 404: not the extension's
    assert value("sse_run_refused_total", status="422") == before["422"] + 1
    assert value("sse_run_refused_total", status="404") == before["404"] + 1
    assert value("sse_run_refused_total", status="405") == before["405"] + 1


def test_get_metrics_serves_them_in_the_text_format_or_openmetrics(app: Flask) -> None:
    client = app.test_client()
    client.post("/pid", json={"n": 1}).get_data()
    found = scrape(client)
    assert found[("sse_run_streams_total", (("end", "complete"), ("function", "pid")))] >= 1
    assert ("sse_run_streams_active", ()) in found
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.content_type.startswith("application/openmetrics-text")
    assert openmetrics.get_data(as_text=True).endswith("# EOF\n")


def test_metrics_are_not_served_unless_asked_for() -> None:
    assert create_app(TESTING=True).test_client().get("/metrics").status_code == 404


def test_another_path_or_none_and_the_app_mounts_the_view() -> None:
    moved = create_app(TESTING=True, SSE_RUN_METRICS=True, SSE_RUN_METRICS_PATH="/internal/metrics")
    assert moved.test_client().get("/metrics").status_code == 404
    scrape(moved.test_client(), "/internal/metrics")
    mounted = create_app(TESTING=True, SSE_RUN_METRICS=True, SSE_RUN_METRICS_PATH=None)
    mounted.add_url_rule("/ops/metrics", view_func=metrics_view)
    assert mounted.test_client().get("/metrics").status_code == 404
    scrape(mounted.test_client(), "/ops/metrics")


@pytest.mark.parametrize("path", ["metrics", "/", ""])
def test_a_bad_metrics_path_fails_at_start_up(path: str) -> None:
    with pytest.raises(ConfigurationError, match="SSE_RUN_METRICS_PATH"):
        create_app(SSE_RUN_METRICS=True, SSE_RUN_METRICS_PATH=path)


def test_metrics_without_prometheus_client_fail_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # what Python does when it is absent
    for module in ("flask_sse_run.metrics", "flask_sse_run.metrics_files"):
        monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ConfigurationError, match=r"pip install 'flask-sse-run\[metrics\]'"):
        create_app(SSE_RUN_METRICS=True)
    create_app(TESTING=True).test_client().post("/pid", json={"n": 1}).get_data()  # off: fine


# --- the LLM blueprint's metrics ----------------------------------------------------------------


def test_the_llm_metrics_have_genai_style_names_and_buckets() -> None:
    metrics = llm_metrics()
    assert llm_metrics() is metrics  # made once per process
    before = value("sse_run_llm_tokens_total")
    metrics.time_to_first_token.observe(0.03)
    metrics.time_per_output_token.observe(0.02)
    metrics.tokens.inc(7)
    metrics.queue.observe(0.5)
    metrics.batch_rows.set(3)
    metrics.tokens_after_cancel.inc(2)
    assert value("sse_run_llm_tokens_total") == before + 7
    assert value("sse_run_llm_batch_rows") == 3
    assert value("sse_run_llm_tokens_after_cancel_total") >= 2
    assert value("sse_run_llm_time_to_first_token_seconds_bucket", le="0.04") >= 1
    assert value("sse_run_llm_time_per_output_token_seconds_bucket", le="0.025") >= 1
    assert value("sse_run_llm_queue_seconds_bucket", le="0.64") >= 1
    text = create_app(TESTING=True, SSE_RUN_METRICS=True).test_client().get("/metrics").get_data(as_text=True)
    types = {
        f.name: f.type
        for f in text_string_to_metric_families(text)
        if f.name.startswith("sse_run_llm") and not f.name.endswith("_created")
    }
    assert types == {
        "sse_run_llm_time_to_first_token_seconds": "histogram",
        "sse_run_llm_time_per_output_token_seconds": "histogram",
        "sse_run_llm_tokens": "counter",
        "sse_run_llm_queue_seconds": "histogram",
        "sse_run_llm_batch_rows": "gauge",
        "sse_run_llm_tokens_after_cancel": "counter",
    }


# --- the multiprocess directory, written by real processes ----------------------------------------

WRITER = """
import json, os, sys
from flask_sse_run.metrics import llm_metrics, stream_metrics
from flask_sse_run.stream_record import Observers
metrics = stream_metrics()
record = Observers((metrics,)).stream("", sys.argv[1], "r")
record.begin()
record.wrote(int(sys.argv[2]), b"", 100)
if sys.argv[3] == "end":
    record.finish(None, None)
llm_metrics().tokens.inc(int(sys.argv[2]))
llm_metrics().time_to_first_token.observe(0.05)
print(os.getpid())
"""


def write_metrics(directory: Path, function: str, events: int, end: bool = True) -> int:
    """A real process writes its metrics to ``directory`` (prometheus_client's multiprocess mode)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", WRITER, function, str(events), "end" if end else "open"]
    return int(subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout)


def collect(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def mark_dead(directory: Path, pid: int) -> None:
    """What gunicorn.conf.py's child_exit does in the master."""
    mark_process_dead(pid, str(directory))
    (directory / f"dead_{pid}").touch()


def test_dead_workers_counts_are_merged_into_one_file_and_kept(tmp_path: Path) -> None:
    first = write_metrics(tmp_path, "a", 3)
    second = write_metrics(tmp_path, "a", 4)
    third = write_metrics(tmp_path, "b", 5, end=False)  # one stream still open when it "died"
    everything = collect(tmp_path)
    assert everything[("sse_run_events_total", (("function", "a"),))] == 7
    assert everything[("sse_run_streams_active", ())] == 1
    for pid in (first, second, third):
        mark_dead(tmp_path, pid)
    with scrape_lock(str(tmp_path)):
        assert sorted(compact(str(tmp_path))) == sorted([first, second, third])
    after = collect(tmp_path)
    # Every count is kept, histograms' buckets too; the dead workers' live gauges are gone (the
    # open stream is not active any more).
    live_gauges = ("sse_run_streams_active", "sse_run_llm_batch_rows")
    assert after == {key: v for key, v in everything.items() if key[0] not in live_gauges}
    assert sorted(os.listdir(tmp_path)) == [
        "counter_archive.db", "histogram_archive.db", "scrape.lock",
    ]  # fmt: skip
    # The next dead worker adds to the archive.
    fourth = write_metrics(tmp_path, "a", 10)
    mark_dead(tmp_path, fourth)
    with scrape_lock(str(tmp_path)):
        compact(str(tmp_path))
    assert collect(tmp_path)[("sse_run_events_total", (("function", "a"),))] == 17
    assert collect(tmp_path)[("sse_run_llm_tokens_total", ())] == 22
    assert not any(str(fourth) in name for name in os.listdir(tmp_path))


def test_a_live_workers_files_are_left_alone(tmp_path: Path) -> None:
    live = write_metrics(tmp_path, "a", 2, end=False)
    dead = write_metrics(tmp_path, "a", 3)
    mark_dead(tmp_path, dead)
    with scrape_lock(str(tmp_path)):
        compact(str(tmp_path))
    names = os.listdir(tmp_path)
    assert f"counter_{live}.db" in names and f"gauge_livesum_{live}.db" in names
    assert f"counter_{dead}.db" not in names
    found = collect(tmp_path)
    assert found[("sse_run_streams_active", ())] == 1
    assert found[("sse_run_events_total", (("function", "a"),))] == 3  # the live one's are not ended


def test_the_metrics_view_sums_every_process_and_sweeps_the_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = [write_metrics(tmp_path, "w", n) for n in (1, 2)]
    mark_dead(tmp_path, pids[0])
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    found = scrape(create_app(TESTING=True, SSE_RUN_METRICS=True).test_client())
    assert found[("sse_run_events_total", (("function", "w"),))] == 3
    assert f"counter_{pids[0]}.db" not in os.listdir(tmp_path)
    assert json.dumps(sorted(os.listdir(tmp_path))).count("archive") == 2


def test_the_llm_metrics_can_be_recorded_from_a_decoding_thread_under_gevent(tmp_path: Path) -> None:
    # The blueprint decodes in real OS threads: recording there, while greenlets record and
    # scrape, neither deadlocks nor loses a count (prometheus_client's locks are gevent's then).
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/llm_metrics_threads.py")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["values"]["sse_run_llm_tokens_total"] == 20_000
    assert seen["values"]["sse_run_llm_tokens_after_cancel_total"] == 20_000
    assert seen["values"]["sse_run_llm_time_per_output_token_seconds_count"] == 20_000
    assert any(name.startswith("gauge_livesum_") for name in seen["files"])
