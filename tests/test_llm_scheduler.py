"""The batched decode loop with real random Falcons (float64: no rounding between batch sizes).

Streams are read by plain threads here (no gevent); the live tests run the same under gunicorn.
Rows join and leave at chosen steps: a thread admits its request once another stream has
produced a given number of items, whatever the machine's speed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

import torch

from flask_sse_run import CancelToken, RequestError, thread_executor
from flask_sse_run.cancellation import bind_token
from flask_sse_run.llm import BatchScheduler, GenerationParams, LoadedModel, load_pretrained
from flask_sse_run.llm.generation import stream_text
from tests.tiny_falcon import save_model

WORDS_PROMPT = "Tell me a story"


# Weights large enough that every token depends on all those before it (see save_model).
SENSITIVE = 0.5


def load64(directory: Path) -> LoadedModel:
    loaded = load_pretrained(str(directory))
    loaded.model.to(torch.float64)
    return loaded


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load64(save_model(tmp_path_factory.mktemp("bpe"), tokenizer="bpe", init_range=SENSITIVE))


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load64(save_model(tmp_path_factory.mktemp("words"), tokenizer="word", init_range=SENSITIVE))


@pytest.fixture(scope="module")
def executor() -> Iterator[concurrent.futures.Executor]:
    pool = thread_executor(1)
    yield pool
    pool.shutdown()


def make(loaded: LoadedModel, executor: concurrent.futures.Executor, **kwargs: Any) -> BatchScheduler:
    return BatchScheduler(loaded.model, loaded.tokenizer, executor=executor, **kwargs)


def greedy(n: int, **kwargs: Any) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, min_new_tokens=n, temperature=0, **kwargs)


def text_of(items: list[dict[str, Any]]) -> str:
    return "".join(item.get("text", "") for item in items)


class Client:
    """One stream read in its own thread; ``after(k)`` waits until it has ``k`` items."""

    def __init__(
        self, open_stream: Callable[[], Iterator[dict[str, Any]]], start: threading.Event | None = None
    ) -> None:
        self.items: list[dict[str, Any]] = []
        self.times: list[float] = []  # when each item arrived
        self.error: BaseException | None = None
        self._open = open_stream
        self._start = start
        self._progress = threading.Condition()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        if self._start is not None:
            assert self._start.wait(60)
        try:
            for item in self._open():
                with self._progress:
                    self.times.append(time.monotonic())
                    self.items.append(item)
                    self._progress.notify_all()
        except BaseException as exc:
            self.error = exc
        with self._progress:
            self._progress.notify_all()

    def after(self, count: int) -> threading.Event:
        """An event set once this stream has ``count`` items (or has ended)."""
        reached = threading.Event()

        def watch() -> None:
            with self._progress:
                self._progress.wait_for(lambda: len(self.items) >= count or not self.thread.is_alive(), 60)
            reached.set()

        threading.Thread(target=watch).start()
        return reached

    def join(self) -> list[dict[str, Any]]:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.items


def serial_text(loaded: LoadedModel, executor: Any, prompt_ids: list[int], params: GenerationParams) -> str:
    """What today's one-generate()-per-stream path streams for this prompt."""
    items = list(stream_text(loaded.model, loaded.tokenizer, prompt_ids, params, executor=executor))
    return text_of(items[:-1])


class Hold:
    """Keep the device's thread busy until :meth:`release`: requests queue up meanwhile, and
    the loop's first turn takes them all in one group."""

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self._go = threading.Event()
        self._future = executor.submit(self._go.wait, 60)

    def release(self) -> None:
        self._go.set()
        self._future.result(60)


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_greedy_rows_joining_and_leaving_at_different_steps_match_serial_generation(
    bpe: LoadedModel, executor: Any
) -> None:
    sched = make(bpe, executor, prefill_chunk=8)  # 4 columns a chunk for a group of two
    encode = bpe.tokenizer.encode
    long, short = encode("Ωμέγα λόγος, Привет мир, שלום"), encode("The")
    assert len(long) >= 12 and len(short) == 1
    wider = encode("Les élèves déjà prêts mangent des crêpes à Noël; 東京 and 北京 are cities.")
    widths: list[tuple[int, int]] = []

    def record_width(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        # Each forward's cache and its width before it (the batch keeps one cache object).
        widths.append((id(kwargs["cache"]), kwargs["cache"].get_seq_length()))

    hook = bpe.model.register_forward_pre_hook(record_width, with_kwargs=True)
    hold = Hold(executor)
    try:
        # One group, prefilled together in chunks: the short prompt is left padding at first.
        # The long one is the widest row and leaves first: the batch's cache is then cut.
        a = Client(lambda: sched.admit(long, greedy(10), started=0.0))
        b = Client(lambda: sched.admit(short, greedy(45), started=0.0))
        wait_for(lambda: len(sched._waiting) == 2)  # both queued (not only admitted)
        hold.release()
        # Then rows join one at a time, at different steps, and leave at different steps; the
        # first is wider than the batch (whose rows are then padded), the others narrower.
        cases = [(a, long, 10), (b, short, 45)]
        c = Client(lambda: sched.admit(wider, greedy(12), started=0.0), b.after(14))
        cases.append((c, wider, 12))
        d = Client(lambda: sched.admit(encode("東京 and"), greedy(20), started=0.0), b.after(20))
        cases.append((d, encode("東京 and"), 20))
        e = Client(lambda: sched.admit(encode("a"), greedy(8), started=0.0), d.after(3))
        cases.append((e, encode("a"), 8))
        for client, prompt, n in cases:
            items = client.join()
            assert items[-1]["finish_reason"] == "length" and items[-1]["generated_tokens"] == n
            assert text_of(items[:-1]) == serial_text(bpe, executor, prompt, greedy(n))
    finally:
        hook.remove()
    assert sched.prefills == 4  # a and b in one group
    assert sched.steps < sum(n for _, _, n in cases) - len(cases)  # they ran together
    # Cut when a left: the same cache got narrower from one forward to the next.
    assert any(c1 == c2 and w2 < w1 for (c1, w1), (c2, w2) in itertools.pairwise(widths))


def sampled(seed: int, n: int = 30, **kwargs: Any) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=n, min_new_tokens=n, temperature=1.3, top_k=20, seed=seed, **kwargs
    )


def test_a_seeded_row_gives_the_same_text_alone_and_in_any_batch(words: LoadedModel, executor: Any) -> None:
    sched = make(words, executor)
    prompt = words.tokenizer.encode(WORDS_PROMPT)

    def seeded() -> Iterator[dict[str, Any]]:
        return sched.admit(prompt, sampled(7, top_p=0.8), started=time.perf_counter())

    alone = text_of(Client(seeded).join())
    # Again, among unseeded rows and others with their own seeds, joining at other steps.
    others = [
        Client(lambda i=i: sched.admit(prompt, sampled(i), started=time.perf_counter())) for i in (1, 2)
    ]
    others.append(Client(lambda: sched.admit(prompt, GenerationParams(max_new_tokens=40), started=0.0)))
    batched = Client(seeded, others[0].after(4))
    assert text_of(batched.join()) == alone
    texts = [text_of(client.join()) for client in others]
    assert texts[0] != texts[1]  # each row draws its own numbers
    assert text_of(Client(seeded).join()) == alone
    different = Client(lambda: sched.admit(prompt, sampled(8, top_p=0.8), started=0.0))
    assert text_of(different.join()) != alone


def test_a_row_cancelled_mid_batch_leaves_at_once_and_the_others_text_unchanged(
    words: LoadedModel, executor: Any
) -> None:
    sched = make(words, executor)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    summaries: list[dict[str, Any]] = []
    first = Client(lambda: sched.admit(prompt, sampled(3), started=0.0))
    doomed = sched.admit(prompt, greedy(2000), started=0.0, on_finish=summaries.append)
    pieces = [next(doomed) for _ in range(5)]
    second = Client(lambda: sched.admit(prompt, sampled(4), started=0.0))
    doomed.close()  # type: ignore[attr-defined]  # returns once the loop has let the row go
    (summary,) = summaries
    assert summary["finish_reason"] == "cancelled" and summary["tokens_after_cancel"] <= 1
    assert 5 <= summary["generated_tokens"] < 100 and all("text" in piece for piece in pieces)
    assert sched.running <= 2  # it is out of the batch already
    # The others' text is what each makes alone (seeded: the same draws).
    assert [text_of(first.join()), text_of(second.join())] == [
        text_of(Client(lambda s=seed: sched.admit(prompt, sampled(s), started=0.0)).join()) for seed in (3, 4)
    ]


def test_a_cancelled_token_ends_its_row_with_a_summary_and_at_most_one_token_after(
    words: LoadedModel, executor: Any
) -> None:
    sched = make(words, executor)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    token = CancelToken()
    summaries: list[dict[str, Any]] = []
    other = Client(lambda: sched.admit(prompt, greedy(60), started=0.0))
    with bind_token(token):  # the runtime binds the stream's token around each next()
        stream = sched.admit(prompt, greedy(2000), started=0.0, on_finish=summaries.append)
        first = [next(stream) for _ in range(3)]
        token.cancel("shutdown")
        rest = list(stream)
    assert all("text" in item for item in first)
    assert rest[-1]["finish_reason"] == "cancelled" and rest[-1]["generated_tokens"] < 2000
    assert summaries[0]["tokens_after_cancel"] <= 1
    assert other.join()[-1]["generated_tokens"] == 60


def test_a_failing_prefill_fails_only_its_row_and_the_loop_goes_on(words: LoadedModel, executor: Any) -> None:
    sched = make(words, executor)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    running = Client(lambda: sched.admit(prompt, greedy(80), started=0.0))
    bad = Client(lambda: sched.admit([10**6], greedy(5), started=0.0), running.after(5))  # no such token
    bad.join()
    assert isinstance(bad.error, IndexError)
    items = running.join()
    assert items[-1]["generated_tokens"] == 80
    assert text_of(items[:-1]) == serial_text(words, executor, prompt, greedy(80))
    assert Client(lambda: sched.admit(prompt, greedy(5), started=0.0)).join()[-1]["generated_tokens"] == 5


def test_a_failing_decode_step_fails_its_rows_and_the_loop_goes_on(words: LoadedModel, executor: Any) -> None:
    sched = make(words, executor)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    failed = threading.Event()

    def fail_once(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        # A fault (an out-of-memory error, say) in the 10th decode step of a two-row batch.
        if kwargs["input_ids"].shape == (2, 1) and sched.steps >= 10 and not failed.is_set():
            failed.set()
            raise RuntimeError("injected failure")

    hook = words.model.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        clients = [Client(lambda: sched.admit(prompt, greedy(200), started=0.0)) for _ in range(2)]
        for client in clients:
            client.join()
        late = Client(lambda: sched.admit(prompt, greedy(7), started=0.0)).join()
    finally:
        hook.remove()
    assert failed.is_set()
    assert all(isinstance(client.error, RuntimeError) for client in clients)
    assert all(0 < len(client.items) < 200 for client in clients)  # the text before, then the error
    assert late[-1]["generated_tokens"] == 7 and sched.running == 0


def test_admission_bounds_the_kv_cache_a_request_that_cannot_fit_waits_or_is_refused(
    words: LoadedModel, executor: Any
) -> None:
    prompt = words.tokenizer.encode(WORDS_PROMPT)  # 4 tokens
    sched = make(words, executor, max_batch_tokens=400)
    with pytest.raises(RequestError) as refused:
        sched.admit(prompt, greedy(397), started=0.0)  # 401 tokens: never fits
    assert refused.value.status == 422 and "FALCON_MAX_BATCH_TOKENS" in str(refused.value.detail)
    columns: list[int] = []

    def measure(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows, new = kwargs["input_ids"].shape
        columns.append(rows * (kwargs["cache"].get_seq_length() + new))  # the cache after this forward

    hook = words.model.register_forward_pre_hook(measure, with_kwargs=True)
    try:
        first = Client(lambda: sched.admit(prompt, greedy(300), started=0.0))
        first.after(2).wait(30)
        # 304 + 154 > 400: the second waits for the first to finish, then runs.
        second = Client(lambda: sched.admit(prompt, greedy(150), started=0.0))
        wait_for(lambda: len(sched._waiting) == 1)
        # The third would fit beside the first, but the second is ahead of it.
        third = Client(lambda: sched.admit(prompt, greedy(20), started=0.0))
        results = [client.join() for client in (first, second, third)]
    finally:
        hook.remove()
    assert [items[-1]["generated_tokens"] for items in results] == [300, 150, 20]
    assert max(columns) <= 400
    assert second.times[0] > first.times[-1]  # it waited for room
    assert third.times[0] > first.times[-1]  # first come, first served: not before the second


def test_beyond_max_batch_and_max_queue_requests_get_503_and_a_closed_stream_gives_its_place_back(
    words: LoadedModel, executor: Any
) -> None:
    sched = make(words, executor, max_batch=1, max_queue=1, retry_after=7)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    running = sched.admit(prompt, greedy(2000), started=0.0)
    next(running)
    queued = sched.admit(prompt, greedy(5), started=0.0)  # not started: holds its place
    with pytest.raises(RequestError) as refused:
        sched.admit(prompt, greedy(5), started=0.0)
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "7"}
    assert (sched.running, sched.waiting) == (1, 1)
    queued.close()  # type: ignore[attr-defined]
    assert (sched.running, sched.waiting) == (1, 0)
    waiting = Client(lambda: sched.admit(prompt, greedy(5), started=0.0))
    deadline = time.monotonic() + 10
    while sched.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.waiting == 1  # queued behind the running row
    running.close()  # type: ignore[attr-defined]
    assert waiting.join()[-1]["generated_tokens"] == 5
    assert (sched.running, sched.waiting) == (0, 0)


def test_a_client_that_has_read_its_summary_finds_its_place_free_at_once(
    words: LoadedModel, executor: Any
) -> None:
    sched = make(words, executor, max_batch=1, max_queue=0)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    for _ in range(30):  # the next request right after the summary: never a 503
        assert list(sched.admit(prompt, greedy(2), started=0.0))[-1]["generated_tokens"] == 2


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_go_on(
    words: LoadedModel, executor: Any
) -> None:
    sched = make(words, executor, prefill_chunk=16)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    long_prompt = words.tokenizer.encode(" ".join(["once upon a time"] * 100))  # 400 tokens
    running = Client(lambda: sched.admit(prompt, greedy(300), started=0.0))
    running.after(3).wait(60)
    steps: list[int] = []

    def long_stream() -> Iterator[dict[str, Any]]:
        steps.append(sched.steps)
        for item in sched.admit(long_prompt, greedy(10), started=0.0):
            steps.append(sched.steps)
            yield item

    long_items = Client(long_stream).join()
    # 400 tokens, 16 a step: the running row made a token at each of the 25 chunks before
    # the long prompt's first token (24 steps apart when the snapshot before admission fell
    # after the step that took the first chunk: seen once on a loaded machine). Prefilled in
    # one go, they would be a step or two apart.
    assert steps[1] - steps[0] >= 24
    assert running.join()[-1]["generated_tokens"] == 300
    assert text_of(long_items[:-1]) == serial_text(words, executor, long_prompt, greedy(10))


def test_one_wakeup_per_step_not_per_row(words: LoadedModel, executor: Any) -> None:
    sched = make(words, executor)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    start = threading.Event()
    clients = [Client(lambda: sched.admit(prompt, greedy(50), started=0.0), start) for _ in range(6)]
    start.set()
    items = sum(len(client.join()) for client in clients)
    assert items >= 6 * 50
    assert sched.wakeups <= sched.steps + sched.prefills
    assert sched.wakeups < items / 3


def test_health_reports_rows_and_rates(words: LoadedModel, executor: Any) -> None:
    sched = make(words, executor, max_batch=4, max_queue=2, max_batch_tokens=4096)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    Client(lambda: sched.admit(prompt, greedy(20), started=0.0)).join()
    deadline = time.monotonic() + 10
    while sched.health()["kv_tokens"] and time.monotonic() < deadline:  # the loop's last turn
        time.sleep(0.01)
    health = sched.health()
    assert health["rows"] == 0 and health["waiting"] == 0 and health["kv_tokens"] == 0
    assert (health["max_batch"], health["max_queue"], health["max_batch_tokens"]) == (4, 2, 4096)
    assert health["steps"] == 19 and health["prefills"] == 1
    assert health["steps_per_s"] > 0 and health["tokens_per_s"] > 0


def test_stop_strings_eos_and_min_new_tokens_end_rows_as_generate_does(
    words: LoadedModel, executor: Any
) -> None:
    sched = make(words, executor)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    full = text_of(Client(lambda: sched.admit(prompt, greedy(30), started=0.0)).join()[:-1])
    spoken = full.split()
    stop = f"{spoken[2][-2:]} {spoken[3][:2]}"  # across two tokens
    items = Client(lambda: sched.admit(prompt, greedy(30, stop=(stop,)), started=0.0)).join()
    assert text_of(items[:-1]) == full[: full.find(stop)] and items[-1]["finish_reason"] == "stop"
    # EOS: make the model's EOS the fourth word; min_new_tokens keeps it from ending earlier.
    k = next(i for i in range(3, len(spoken)) if spoken[i] not in spoken[:i])
    eos = words.tokenizer.convert_tokens_to_ids(spoken[k])
    sched_eos = BatchScheduler(words.model, words.tokenizer, executor=executor)
    sched_eos.eos_ids = {eos}
    items = Client(
        lambda: sched_eos.admit(prompt, GenerationParams(max_new_tokens=30, temperature=0), started=0.0)
    ).join()
    assert items[-1]["finish_reason"] == "eos" and text_of(items[:-1]).split() == spoken[: k + 1]
    at_least = GenerationParams(max_new_tokens=30, min_new_tokens=30, temperature=0)
    items = Client(lambda: sched_eos.admit(prompt, at_least, started=0.0)).join()
    assert items[-1]["finish_reason"] == "length" and items[-1]["generated_tokens"] == 30


def test_metrics_record_each_generation_and_the_rows_after_each_step(
    words: LoadedModel, executor: Any
) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import REGISTRY

    from flask_sse_run.llm.tally import record_metrics
    from flask_sse_run.metrics import llm_metrics

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    names = (
        "sse_run_llm_tokens_total", "sse_run_llm_tokens_after_cancel_total",
        "sse_run_llm_queue_seconds_count", "sse_run_llm_time_to_first_token_seconds_count",
        "sse_run_llm_time_per_output_token_seconds_count",
    )  # fmt: skip
    before = {name: value(name) for name in names}
    metrics = llm_metrics()
    sched = make(words, executor, metrics=metrics)
    prompt = words.tokenizer.encode(WORDS_PROMPT)
    summaries: list[dict[str, Any]] = []

    def record(summary: dict[str, Any]) -> None:  # what the service does with on_finish
        summaries.append(summary)
        record_metrics(metrics, summary)

    finished = Client(lambda: sched.admit(prompt, greedy(12), started=time.perf_counter(), on_finish=record))
    doomed = sched.admit(prompt, greedy(2000), started=time.perf_counter(), on_finish=record)
    next(doomed)
    assert value("sse_run_llm_batch_rows") >= 1  # set after each step
    finished.join()
    doomed.close()  # type: ignore[attr-defined]
    wait_for(lambda: value("sse_run_llm_batch_rows") == 0)
    done, cancelled = summaries
    assert done["queue_ms"] >= 0 and done["time_per_output_token_ms"] > 0
    gained = {name: value(name) - before[name] for name in names}
    assert gained == {
        "sse_run_llm_tokens_total": 12 + cancelled["generated_tokens"],
        "sse_run_llm_tokens_after_cancel_total": cancelled["tokens_after_cancel"],
        "sse_run_llm_queue_seconds_count": 2,
        "sse_run_llm_time_to_first_token_seconds_count": 2,
        "sse_run_llm_time_per_output_token_seconds_count": 2 if cancelled["generated_tokens"] >= 2 else 1,
    }
