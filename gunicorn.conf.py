"""gunicorn settings for the example app; every value can be overridden from the environment.

Run: ``gunicorn -c gunicorn.conf.py wsgi:app``. Environment variables: GUNICORN_BIND,
GUNICORN_WORKERS, GUNICORN_WORKER_CONNECTIONS, GUNICORN_TIMEOUT, GUNICORN_GRACEFUL_TIMEOUT,
GUNICORN_KEEPALIVE, GUNICORN_BACKLOG, GUNICORN_LOGLEVEL, GUNICORN_ACCESSLOG,
GUNICORN_WORKER_CLASS, GUNICORN_CONTROL_SOCKET.
"""

import os


def _env(name: str, default: str) -> str:
    return os.environ.get(f"GUNICORN_{name}", default)


bind = _env("BIND", "127.0.0.1:8000")
# gevent: each stream is a greenlet, so one worker holds thousands of open streams while its
# generators sleep or wait on I/O. A thread per stream (sync/gthread) would not scale.
worker_class = _env("WORKER_CLASS", "gevent")
workers = int(_env("WORKERS", "1"))
# The default (1000) makes stream 1001 wait in the accept queue until another one ends.
worker_connections = int(_env("WORKER_CONNECTIONS", "10000"))
timeout = int(_env("TIMEOUT", "30"))
graceful_timeout = int(_env("GRACEFUL_TIMEOUT", "10"))
keepalive = int(_env("KEEPALIVE", "5"))
loglevel = _env("LOGLEVEL", "info")
accesslog = _env("ACCESSLOG", "-")
# gunicorn 27's control socket has one default path per user: a second server on the machine
# (tests, a second app) would fight over it. Opt in with GUNICORN_CONTROL_SOCKET=/path.
control_socket = _env("CONTROL_SOCKET", "")
control_socket_disable = not control_socket


def post_fork(server: object, worker: object) -> None:
    """In each worker, before gevent patches it: import torch and transformers if they serve.

    huggingface_hub cannot be imported once gevent has patched ``select`` (no ``epoll``) and
    ``subprocess``; importing starts no torch thread, so the worker's fork is safe.
    """
    from example_app.falcon import prepare_worker

    prepare_worker()


def post_worker_init(worker: object) -> None:
    """Start loading the Falcon model (if FALCON_MODEL is set) in the worker, after the fork.

    Never in the master: with --preload, torch work there would deadlock the forked workers.
    """
    from example_app.falcon import start_in_worker

    start_in_worker(getattr(worker, "wsgi", None))
