"""The Falcon endpoints under real gunicorn with the gevent worker, and a tiny random Falcon."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("torch")

from flask_sse_run.testing import SSEParser
from tests.latency import polled_latencies
from tests.live import Server, gunicorn
from tests.tiny_falcon import save_model

PROMPT = "Tell me a story"
NO_GZIP = {"Accept-Encoding": "identity"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("falcon"))


def wait_ready(server: Server, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = requests.get(f"{server.url}/falcon/health", timeout=5).json()
        if body["status"] != "loading":
            return body
        time.sleep(0.1)
    raise AssertionError(f"the model did not load in time:\n{server.log()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    """The default: up to 16 streams decoded together."""
    env = {"FALCON_MODEL": str(model_dir), "FALCON_MAX_QUEUE": "1", "HF_HUB_OFFLINE": "1"}
    with gunicorn("wsgi:app", tmp_path=tmp_path_factory.mktemp("live"), env=env) as srv:
        assert wait_ready(srv)["status"] == "ready", srv.log()
        yield srv


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Server]:
    """One row at a time and one waiting, runs cancelled 1 s after their client left: the queue's
    tests."""
    env = {
        "FALCON_MODEL": str(model_dir),
        "FALCON_MAX_BATCH": "1",
        "FALCON_MAX_QUEUE": "1",
        "HF_HUB_OFFLINE": "1",
        # A run whose client left waits this long for a reconnect before it is cancelled.
        "EXAMPLE_SSE_RUN_RESUME_WINDOW": "1",
    }
    with gunicorn("wsgi:app", tmp_path=tmp_path_factory.mktemp("narrow"), env=env) as srv:
        assert wait_ready(srv)["status"] == "ready", srv.log()
        yield srv


def post(server: Server, body: dict[str, Any], **kwargs: Any) -> requests.Response:
    return requests.post(f"{server.url}/falcon/run", json=body, headers=NO_GZIP, timeout=60, **kwargs)


def read_events(response: requests.Response, limit: int | None = None) -> list[tuple[float, dict[str, Any]]]:
    """The events of a stream, each with the time it arrived."""
    parser, out = SSEParser(), []
    for chunk in response.raw.stream(65536, decode_content=True):
        now = time.monotonic()
        out.extend((now, json.loads(event.data)) for event in parser.feed(chunk))
        if limit is not None and len(out) >= limit:
            break
    return out


def health(server: Server) -> dict[str, Any]:
    return requests.get(f"{server.url}/falcon/health", timeout=5).json()  # type: ignore[no-any-return]


def wait_idle(server: Server, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = health(server)
        if body["running"] == 0 and body["waiting"] == 0:
            return body
        time.sleep(0.05)
    raise AssertionError("generations did not end")


def test_tokens_arrive_progressively_while_other_endpoints_stay_fast(server: Server) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 2000, "min_new_tokens": 2000}
    started = time.monotonic()
    with post(server, body, stream=True) as response, polled_latencies(f"{server.url}/health") as latencies:
        arrivals = read_events(response)
    pieces, (_, final) = arrivals[:-1], arrivals[-1]
    assert final["finish_reason"] == "length" and final["generated_tokens"] == 2000
    assert len(pieces) >= 1900  # one event per word; a few tokens may be <unk> (no text)
    times = [t for t, _ in pieces]
    spread = times[-1] - times[0]
    # Progressive: the events spread over the generation, no burst at the end. Each tenth of
    # the events arrived over a noticeable stretch of time, the first one early.
    assert times[0] - started < 0.5 * (times[-1] - started)
    tenths = [times[i * len(times) // 10 : (i + 1) * len(times) // 10] for i in range(10)]
    assert all(chunk[-1] - chunk[0] > spread / 50 for chunk in tenths), [c[-1] - c[0] for c in tenths]
    # The other endpoint answered throughout (a worker frozen by generate() would answer seconds late).
    assert len(latencies) >= 20
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
    assert p99 < 0.5, f"p99 {p99 * 1000:.1f} ms over {len(latencies)} requests"


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(event.get("text", "") for event in events)


def test_a_client_that_drops_mid_generation_reconnects_and_gets_the_rest_generated_once(
    server: Server,
) -> None:
    before = wait_idle(server)
    body = {"prompt": PROMPT, "max_new_tokens": 2000, "min_new_tokens": 2000, "temperature": 0}
    response = post(server, body, stream=True)
    run_id = response.headers["X-Run-ID"]
    parser, first = SSEParser(), []
    for chunk in response.raw.stream(65536, decode_content=True):
        first.extend(parser.feed(chunk))
        if len(first) >= 20:
            break
    response.close()  # the connection drops mid-generation; the run goes on without it
    assert health(server)["running"] == 1
    last_id = first[-1].id
    assert last_id == f"{run_id}:{len(first)}"
    headers = {**NO_GZIP, "Last-Event-ID": last_id}
    rest_response = requests.post(
        f"{server.url}/falcon/run", json={"prompt": "ignored"}, headers=headers, timeout=60
    )
    assert rest_response.status_code == 200 and rest_response.headers["X-Run-ID"] == run_id
    rest = list(SSEParser().feed(rest_response.content))
    events = [json.loads(event.data) for event in [*first, *rest]]
    assert [event.id for event in [*first, *rest]] == [f"{run_id}:{i + 1}" for i in range(len(events))]
    pieces, summary = events[:-1], events[-1]
    assert [piece["index"] for piece in pieces] == list(range(len(pieces)))  # none lost, none twice
    assert (summary["finish_reason"], summary["generated_tokens"]) == ("length", 2000)
    # The same text as a fresh greedy generation of the same prompt, and generated once: the
    # service counted one generation of 2000 tokens, not two.
    after = wait_idle(server)
    assert after["finished"]["length"] - before["finished"].get("length", 0) == 1
    assert after["tokens_generated"] - before["tokens_generated"] == 2000
    fresh, _ = texts(server, body)
    assert text_of(pieces) == fresh
    # Read to its end: a reconnect now is told to stop (204).
    again = requests.get(f"{server.url}/falcon/runs/{run_id}?last_event_id={len(events)}", timeout=10)
    assert again.status_code == 204


def test_delete_of_the_run_stops_its_row_at_the_next_step(server: Server) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 2000, "min_new_tokens": 2000}
    response = post(server, body, stream=True)
    run_id = response.headers["X-Run-ID"]
    parser, received = SSEParser(), []
    chunks = response.raw.stream(65536, decode_content=True)
    for chunk in chunks:
        received.extend(parser.feed(chunk))
        if len(received) >= 20:
            break
    deleted = requests.delete(f"{server.url}/falcon/runs/{run_id}", timeout=10)
    assert deleted.status_code == 204
    deleted_at = time.monotonic()
    for chunk in chunks:  # the stream that followed the run ends, cleanly
        received.extend(parser.feed(chunk))
    wait_idle(server)
    stopped_after = time.monotonic() - deleted_at
    # Recorded by the run's greenlet once the loop has let the row go: a moment after it left.
    deadline = time.monotonic() + 5
    while (last := health(server)["last_generation"])["finish_reason"] != "cancelled":
        assert time.monotonic() < deadline, last
        time.sleep(0.02)
    # The row leaves the batch at the next step: at most the token of the step running then.
    assert last["tokens_after_cancel"] <= 1
    # The pieces it had made, then why it stopped (the run ended in its store at the DELETE).
    assert received[-1].event == "error" and json.loads(received[-1].data)["type"] == "RunCancelled"
    assert len(received) - 1 <= last["generated_tokens"] < 1000
    assert stopped_after < 2
    assert re.search(r"cancelled after \d+ tokens \([01] computed after the client left\)", server.log())


def test_eight_concurrent_streams_are_decoded_together_and_each_arrives_progressively(server: Server) -> None:
    tokens, streams = 400, 8
    steps_before = health(server)["batch"]["steps"]
    start = threading.Barrier(streams)
    results: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in range(streams)]

    def one(i: int) -> None:
        start.wait()
        body = {"prompt": PROMPT, "max_new_tokens": tokens, "min_new_tokens": tokens, "temperature": 0}
        with post(server, body, stream=True) as response:
            results[i] = read_events(response)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    finals = [events[-1][1] for events in results]
    assert [(f["finish_reason"], f["generated_tokens"]) for f in finals] == [("length", tokens)] * streams
    firsts = [events[0][0] for events in results]
    lasts = [events[-1][0] for events in results]
    # Interleaved, not one after another: every stream had its first text before any ended.
    assert max(firsts) < min(lasts)
    for events in results:
        # Progressive: each stream's text spread over its life, not in one burst at the end.
        times = [t for t, _ in events[:-1]]
        spread = times[-1] - times[0]
        quarters = [times[i * len(times) // 4 : (i + 1) * len(times) // 4] for i in range(4)]
        assert all(q[-1] - q[0] > spread / 20 for q in quarters), [q[-1] - q[0] for q in quarters]
    # One batch: far fewer decode steps than the 3200 tokens (one generate() each would take
    # 3200), and /falcon/health reports it.
    batch = wait_idle(server)["batch"]
    assert batch["steps"] - steps_before < streams * tokens / 2
    assert batch["wakeups"] <= batch["steps"] + batch["prefills"] + 20  # one per step, not per row
    assert batch["steps_per_s"] > 0 and batch["tokens_per_s"] > 0 and batch["rows"] == 0


def test_health_is_answered_while_long_prompts_are_being_tokenized(server: Server) -> None:
    # Three prompts of a megabyte (under the 1 MiB body limit): a few tenths of a second of the
    # tokenizer each, two at a time, the third waiting its turn. Each is then refused as too
    # long for the context, as a hostile one would be.
    prompt = ("Tell me a story about the snow man " * 30_000)[:1_000_000]
    served = requests.get(f"{server.url}/falcon/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": served, "prompt": prompt}
    answers: list[requests.Response] = []

    def send() -> None:
        answers.append(requests.post(f"{server.url}/falcon/v1/completions", json=body, timeout=120))

    senders = [threading.Thread(target=send) for _ in range(3)]
    for sender in senders:
        sender.start()
    seen_tokenizing = False
    try:
        deadline = time.monotonic() + 120
        while len(answers) < 3 and not seen_tokenizing:
            assert time.monotonic() < deadline
            health = requests.get(f"{server.url}/falcon/health", timeout=60).json()
            seen_tokenizing = health.get("tokenizing", 0) >= 1
        # The worker answers while a prompt is in the tokenizer, and another waits for it.
        plain = requests.get(f"{server.url}/health", timeout=60)
        still_open = len(answers) < 3
    finally:
        for sender in senders:
            sender.join()
    assert seen_tokenizing, "the health endpoint was never answered while a prompt was tokenized"
    assert plain.status_code == 200 and still_open
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "context_length_exceeded"


def test_two_concurrent_requests_both_complete(server: Server) -> None:
    results: list[list[tuple[float, dict[str, Any]]]] = []

    def one() -> None:
        with post(server, {"prompt": PROMPT, "max_new_tokens": 100, "min_new_tokens": 100}, stream=True) as r:
            results.append(read_events(r))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [events[-1][1]["finish_reason"] for events in results] == ["length", "length"]
    assert [events[-1][1]["generated_tokens"] for events in results] == [100, 100]


def test_beyond_the_queue_requests_get_503_with_retry_after(narrow: Server) -> None:
    server = narrow
    running = post(server, {"prompt": PROMPT, "max_new_tokens": 2000, "min_new_tokens": 2000}, stream=True)
    chunks = running.raw.stream(1024)
    next(chunks)  # it runs; the connection stays open while ``chunks`` is not closed
    queued: list[requests.Response] = []
    waiter = threading.Thread(
        target=lambda: queued.append(
            post(server, {"prompt": PROMPT, "max_new_tokens": 5, "min_new_tokens": 5}, stream=True)
        )
    )
    waiter.start()
    try:
        deadline = time.monotonic() + 10
        while health(server)["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = post(server, {"prompt": PROMPT})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "5" and "busy" in refused.json()["error"]
    finally:
        chunks.close()
        running.close()
        waiter.join(timeout=30)
    (second,) = queued
    final = read_events(second)[-1][1]
    assert (final["finish_reason"], final["generated_tokens"]) == ("length", 5)  # it ran after the first
    wait_idle(server)


def texts(server: Server, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    response = post(server, body)
    assert response.status_code == 200
    events = [json.loads(e.data) for e in SSEParser().feed(response.content)]
    return "".join(e["text"] for e in events[:-1]), events[-1]


def test_the_same_seed_gives_the_same_text_and_stop_strings_end_it(server: Server) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 40, "min_new_tokens": 40, "temperature": 1.2, "seed": 11}
    first, _ = texts(server, body)
    assert texts(server, body)[0] == first
    assert texts(server, {**body, "seed": 12})[0] != first
    words = first.split()
    stop = f"{words[3]} {words[4]}"
    text, final = texts(server, {**body, "stop": [stop]})
    assert text == first[: first.find(stop)] and final["finish_reason"] == "stop"


def test_bad_parameters_get_422(server: Server) -> None:
    response = post(server, {"prompt": "", "temperature": 3, "top_p": 0})
    assert response.status_code == 422
    assert {d["loc"][0] for d in response.json()["detail"]} == {"prompt", "temperature", "top_p"}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_call_streams_the_story(server: Server) -> None:
    command = [
        "curl", "-sS", "-N", "-X", "POST", f"{server.url}/falcon/run",
        "-H", "Content-Type: application/json", "--data", '{"prompt": "Tell me a story"}',
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, timeout=60, check=True).stdout
    events = [json.loads(event.data) for event in SSEParser().feed(output)]
    assert events and all("text" in event for event in events[:-1])
    assert events[-1]["finish_reason"] in {"length", "eos"} and events[-1]["generated_tokens"] <= 256


def test_without_falcon_model_the_endpoints_answer_503_and_the_app_works(tmp_path: Path) -> None:
    env = {"FALCON_MODEL": ""}
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as srv:
        response = requests.post(f"{srv.url}/falcon/run", json={"prompt": PROMPT}, timeout=10)
        assert response.status_code == 503 and "set FALCON_MODEL" in response.json()["error"]
        assert requests.get(f"{srv.url}/falcon/health", timeout=5).json()["status"] == "disabled"
        assert requests.get(f"{srv.url}/health", timeout=5).json() == {"status": "ok"}


def test_with_preload_the_model_loads_in_the_worker_not_the_master(tmp_path: Path, model_dir: Path) -> None:
    env = {"FALCON_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1"}
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env, args=("--preload",)) as srv:
        assert wait_ready(srv)["status"] == "ready"
        text, final = texts(srv, {"prompt": PROMPT, "max_new_tokens": 5, "min_new_tokens": 5})
        assert final["generated_tokens"] == 5 and text
        loaded_by = r"pid (\d+): imported torch and transformers in [\d.]+ s; loading model"
        loaders = re.findall(loaded_by, srv.log())
        assert loaders and all(int(pid) != srv.process.pid for pid in loaders)


def test_a_client_that_leaves_while_queued_gives_its_place_back_when_the_window_ends(narrow: Server) -> None:
    server = narrow
    import socket

    running = post(server, {"prompt": PROMPT, "max_new_tokens": 2000, "min_new_tokens": 2000}, stream=True)
    chunks = running.raw.stream(1024)
    next(chunks)  # the first generation runs
    try:
        body = json.dumps({"prompt": PROMPT, "max_new_tokens": 5}).encode()
        queued = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        queued.sendall(
            f"POST /falcon/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 10
        while health(server)["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert health(server)["waiting"] == 1
        queued.close()  # the waiting client goes away; its run waits for a reconnect, 1 s
        deadline = time.monotonic() + 4
        while health(server)["waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (
            health(server)["waiting"] == 0
        )  # its place is free once the window ended, not when its turn came
        assert health(server)["running"] == 1
    finally:
        chunks.close()
        running.close()
    wait_idle(server)


def test_the_worker_answers_while_torch_imports_and_its_log_is_clean(tmp_path: Path, model_dir: Path) -> None:
    env = {"FALCON_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1"}
    with gunicorn("wsgi:app", tmp_path=tmp_path, env=env) as srv:
        # The worker answers as soon as it has booted: torch imports on the model's thread.
        first = requests.get(f"{srv.url}/falcon/health", timeout=5).json()
        assert first["status"] == "loading" and first["step"] == "importing torch and transformers"
        assert requests.get(f"{srv.url}/health", timeout=5).json() == {"status": "ok"}
        assert wait_ready(srv)["status"] == "ready"
        assert texts(srv, {"prompt": PROMPT, "max_new_tokens": 5})[1]["generated_tokens"] == 5
    log = srv.log()
    assert "Worker exiting" in log
    # The log says when the import starts and when it ends, in that order.
    assert log.index("importing torch and transformers") < log.index("imported torch and transformers in")
    # ssl is imported after gevent patched it; torch after gevent.thread (whose teardown at exit
    # came first while torch's logging handlers were still to be removed).
    assert "MonkeyPatchWarning" not in log
    assert "Exception ignored" not in log
