"""SIGTERM (spot reclaim, Kueue preemption, node drain): during training, stop at the next step boundary
and commit a checkpoint, then exit 143; anywhere else there is nothing to commit, so stop at once (a
publish cut short leaves no manifest, and the next attempt publishes)."""

import logging
import signal
import threading
import time
from contextlib import contextmanager

from job.errors import Preempted

log = logging.getLogger(__name__)

_requested = threading.Event()
_deferred = threading.Event()
_requested_at = [0.0]


def install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    first = not _requested.is_set()
    if first:
        _requested_at[0] = time.monotonic()
    _requested.set()
    if _deferred.is_set():
        if first:
            log.warning("SIGTERM: stopping at the next step boundary to commit a checkpoint")
        return
    log.warning("SIGTERM: stopping now")
    raise Preempted("stopped by SIGTERM outside training: the next attempt resumes from the last checkpoint")


def requested() -> bool:
    return _requested.is_set()


def seconds_since_request() -> float:
    return time.monotonic() - _requested_at[0] if _requested.is_set() else 0.0


@contextmanager
def deferred():
    """SIGTERM only sets requested() inside: the trainer stops at its next step, and a commit under way finishes."""
    _deferred.set()
    try:
        yield
    finally:
        _deferred.clear()
