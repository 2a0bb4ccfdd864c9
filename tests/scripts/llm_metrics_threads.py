"""The LLM metrics recorded from a native thread (a decoding loop) while greenlets record and
scrape, under gevent's monkey-patching, in prometheus_client's multiprocess mode; prints JSON.

Run by tests/test_metrics.py in a subprocess (patching is process-wide), with
PROMETHEUS_MULTIPROC_DIR set to an empty directory.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402

import gevent  # noqa: E402
from gevent.monkey import get_original  # noqa: E402

from flask_sse_run.metrics import llm_metrics, stream_metrics  # noqa: E402
from tests.observed_app import create_app  # noqa: E402

STEPS = 20_000
metrics = llm_metrics()
done = []


def decode() -> None:  # a real OS thread, as the blueprint's batch loop is
    for step in range(STEPS):
        metrics.tokens.inc()
        metrics.batch_rows.set(step % 8)
        metrics.time_per_output_token.observe(0.02)
    done.append(True)


def greenlet_side() -> None:  # the streams' greenlets record and the scrapes read meanwhile
    client = create_app(TESTING=True, SSE_RUN_METRICS=True).test_client()
    for step in range(STEPS):
        metrics.tokens_after_cancel.inc()
        stream_metrics().active.inc()
        stream_metrics().active.dec()
        if step % 2000 == 0:
            assert client.get("/metrics").status_code == 200
            gevent.sleep(0)


get_original("threading", "Thread")(target=decode, daemon=True).start()
gevent.spawn(greenlet_side).join()
while not done:
    gevent.sleep(0.01)
scraped = create_app(TESTING=True, SSE_RUN_METRICS=True).test_client().get("/metrics").get_data(as_text=True)
values = {
    line.split(" ")[0]: float(line.split(" ")[1])
    for line in scraped.splitlines()
    if line.startswith(
        ("sse_run_llm_tokens_total", "sse_run_llm_tokens_after_cancel_total", "sse_run_llm_time_per")
    )
}
print(json.dumps({"values": values, "files": sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]))}))
