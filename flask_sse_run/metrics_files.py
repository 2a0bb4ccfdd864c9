"""prometheus_client's multiprocess directory under gunicorn: kept empty at start, and small.

With ``PROMETHEUS_MULTIPROC_DIR`` set, each process writes its metrics to files there, one per
kind and pid (``counter_<pid>.db``, ``gauge_livesum_<pid>.db``, ...), and a scrape sums them all.
Three things keep that right over a server's life; ``gunicorn.conf.py`` does the first two in
gunicorn's master (plain code: the master must not import this package, which would import
``ssl`` before gevent patches the workers):

* ``on_starting``: the directory is made and emptied (files left by an earlier server would
  add its counts to this one's);
* ``child_exit``, for each worker that exited, however it died (SIGKILL too):
  ``prometheus_client.multiprocess.mark_process_dead(pid)`` removes its ``live*`` gauge files,
  so ``sse_run_streams_active`` stops counting its streams, and a marker ``dead_<pid>`` is left;
* here, at the next scrape (:func:`compact`, from :func:`~flask_sse_run.metrics.metrics_view`):
  each marked worker's counter, histogram and summary files are added into one file per kind
  (``counter_archive.db``, ...) and removed. Its counts are kept (counters never go back), and
  the files do not pile up as workers are replaced (``max_requests``; prometheus_client #275,
  #568). Other gauges of a dead worker are left as their mode says (``all``, ``max`` ...).

A scrape and a merge never overlap (an exclusive ``flock`` on ``<dir>/scrape.lock``, taken
without blocking the gevent hub), so no scrape sees a dead worker's counts twice, or not at all.
"""

from __future__ import annotations

import fcntl
import glob
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .extras import missing_extra

try:
    from prometheus_client.mmap_dict import MmapedDict
except ImportError as error:
    raise missing_extra("metrics", error) from error

__all__ = ["DEAD_MARKER", "MULTIPROC_ENV", "compact", "scrape_lock"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The file ``child_exit`` leaves for a dead worker: ``dead_<pid>``.
DEAD_MARKER = "dead_"
#: The kinds whose values add up across processes (a gauge's mode decides for itself).
_ADDITIVE = ("counter", "histogram", "summary")
#: How often a scrape retries a lock another worker holds (seconds).
_LOCK_RETRY = 0.005


@contextmanager
def scrape_lock(path: str) -> Iterator[None]:
    """Hold the directory's lock; under gevent, waiting for it lets the worker's streams run."""
    with open(os.path.join(path, "scrape.lock"), "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(_LOCK_RETRY)  # gevent's sleep in a gevent worker
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def compact(path: str) -> list[int]:
    """Merge the files of the workers marked dead into one file per kind; return their pids.

    Call with :func:`scrape_lock` held.
    """
    markers = glob.glob(os.path.join(path, f"{DEAD_MARKER}*"))
    names = [os.path.basename(marker)[len(DEAD_MARKER) :] for marker in markers]
    pids = [int(name) for name in names if name.isdigit()]
    for kind in _ADDITIVE:
        sources = [f for pid in pids if os.path.exists(f := os.path.join(path, f"{kind}_{pid}.db"))]
        if sources:
            _merge(os.path.join(path, f"{kind}_archive.db"), sources)
    for marker in markers:
        os.remove(marker)
    return pids


def _merge(archive: str, sources: list[str]) -> None:
    totals: dict[str, float] = {}
    read = MmapedDict.read_all_values_from_file
    for name in [archive, *sources] if os.path.exists(archive) else sources:
        # Raw values, as each process wrote them: a histogram's buckets are not cumulative
        # there, so every value adds up.
        for key, value, _timestamp, _position in read(name):  # type: ignore[no-untyped-call]
            totals[key] = totals.get(key, 0.0) + value
    written = archive + ".new"  # not *.db: a scrape never reads it half written
    merged = MmapedDict(written)  # type: ignore[no-untyped-call]
    try:
        for key, value in totals.items():
            merged.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    finally:
        merged.close()  # type: ignore[no-untyped-call]
    os.replace(written, archive)
    for name in sources:
        os.remove(name)
