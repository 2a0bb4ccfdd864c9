"""gunicorn settings for the example app; every value can be overridden from the environment.

Run: ``gunicorn -c gunicorn.conf.py wsgi:app``. Environment variables: GUNICORN_BIND,
GUNICORN_WORKERS, GUNICORN_WORKER_CONNECTIONS, GUNICORN_TIMEOUT, GUNICORN_GRACEFUL_TIMEOUT,
GUNICORN_KEEPALIVE, GUNICORN_BACKLOG, GUNICORN_LOGLEVEL, GUNICORN_ACCESSLOG,
GUNICORN_WORKER_CLASS, GUNICORN_CONTROL_SOCKET; FALCON_MODEL enables the Falcon blueprint;
PROMETHEUS_MULTIPROC_DIR puts the metrics (SSE_RUN_METRICS) of every worker in one scrape.
"""

import os
from typing import Any


def _env(name: str, default: str) -> str:
    return os.environ.get(f"GUNICORN_{name}", default)


# Loopback by default: the example app is a demo; set GUNICORN_BIND=0.0.0.0:8000 to expose it.
bind = _env("BIND", "127.0.0.1:8000")
# gevent: each stream is a greenlet, so one worker holds thousands of open streams while its
# generators sleep or wait on I/O. A thread per stream (sync/gthread) would not scale.
worker_class = _env("WORKER_CLASS", "gevent")
# One worker per core is the usual rule; the default 1 keeps the demo's model loaded once.
workers = int(_env("WORKERS", "1"))
# The default (1000) makes stream 1001 wait in the accept queue until another one ends.
worker_connections = int(_env("WORKER_CONNECTIONS", "10000"))
# Thousands of clients may connect in one burst (reconnecting after a deploy): the kernel's
# accept queue must hold them until the worker accepts (gunicorn's default is 2048).
backlog = int(_env("BACKLOG", "4096"))
# The heartbeat deadline. Streams are long, but the hub gets a turn every few milliseconds (fair
# slices), so a worker that misses 30 s of heartbeats is really stuck and is better restarted.
timeout = int(_env("TIMEOUT", "30"))
# On SIGTERM, open streams get the shutdown event at once (post_worker_init's hook); this only
# needs to cover writing those events and finishing short requests.
graceful_timeout = int(_env("GRACEFUL_TIMEOUT", "10"))
# Seconds an idle HTTP keep-alive connection stays open between requests: long enough for a
# client's next call, short enough not to hold thousands of idle sockets.
keepalive = int(_env("KEEPALIVE", "5"))
loglevel = _env("LOGLEVEL", "info")
accesslog = _env("ACCESSLOG", "-")
# gunicorn 27's control socket has one default path per user: a second server on the machine
# (tests, a second app) would fight over it. Opt in with GUNICORN_CONTROL_SOCKET=/path.
control_socket = _env("CONTROL_SOCKET", "")
control_socket_disable = not control_socket


def on_starting(server: object) -> None:
    """In the master, before any worker: ``PROMETHEUS_MULTIPROC_DIR``, if set, made and emptied.

    Each worker writes its metrics there (prometheus_client's multiprocess mode); files left by
    an earlier server would add its counts to this one's. A re-exec (USR2) keeps them: the old
    master's workers still count. Plain code: the master must not import flask_sse_run (see
    ``flask_sse_run/metrics_files.py``).
    """
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir and "GUNICORN_PID" not in os.environ:
        os.makedirs(metrics_dir, exist_ok=True)
        for entry in os.scandir(metrics_dir):
            if entry.is_file():
                os.remove(entry.path)


def child_exit(server: object, worker: Any) -> None:
    """In the master, for each worker that exited, however it died (SIGKILL, max_requests ...).

    Its live gauges go (``sse_run_streams_active`` stops counting its streams), and a marker
    asks the next scrape to merge its counters and histograms into one file, so dead workers'
    files do not pile up (prometheus_client #275, #568).
    """
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir or not os.path.isdir(metrics_dir):
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:  # metrics are off without it: no file to look after
        return
    multiprocess.mark_process_dead(worker.pid, metrics_dir)
    with open(os.path.join(metrics_dir, f"dead_{worker.pid}"), "w"):
        pass


def post_worker_init(worker: object) -> None:
    """Once the app is loaded in a worker: shutdown hook, GC freeze, Falcon loading.

    The model is loaded here, after the fork, never in the master: with --preload, torch work
    there would deadlock the forked workers. Nothing LLM-related runs before gevent patches the
    worker: torch and transformers are imported on the worker's torch thread while it serves,
    and ssl is imported patched (no MonkeyPatchWarning).
    """
    import gc

    from flask_sse_run.shutdown import install_gunicorn_hook
    from flask_sse_run.stream_log import log_with_gunicorn

    # Streams outlive any graceful_timeout: on SIGTERM, open streams get the shutdown event
    # (SSE_RUN_SHUTDOWN_EVENT) and end cleanly instead of being cut mid-event at the deadline.
    install_gunicorn_hook(worker)
    # The line each stream logs at its end (SSE_RUN_STREAM_LOG) goes where gunicorn's log goes.
    log_with_gunicorn(worker)
    # Move everything allocated so far out of the collector's sight. With thousands of streams,
    # full collections scanning long-lived app objects are the latency tail (measured: first-event
    # p99 57 ms with GC as is, 1.4 ms with GC off).
    gc.freeze()
    # Full collections scan every live object. While 10,000 streams opened (about 80 objects
    # each) the default thresholds ran ten of them, the last taking 150 ms with the whole worker
    # stopped: gap p99 1.09 s, against 1.02 s with this setting. Young collections (the first
    # two numbers, as default) still free short-lived cycles, and full ones still run, a hundred
    # times less often; measured, what they find is about 1,000 objects per 30,000 requests.
    gc.set_threshold(700, 10, 1000)
    # An app with the Falcon blueprint starts loading its model here, after the fork (a no-op for
    # any other app; importing the blueprint's module does not import torch).
    from flask_sse_run.llm.falcon import start_in_worker

    start_in_worker(getattr(worker, "wsgi", None))
