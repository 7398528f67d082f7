"""SIGTERM (spot reclaim, Kueue preemption, node drain) and SIGINT (Ctrl-C in a terminal or `docker run -it`):
during training, stop at the next step boundary and commit a checkpoint, then exit 143 (SIGTERM) or 130 (SIGINT);
anywhere else there is nothing to commit, so stop at once (a publish cut short leaves no manifest, and the next
attempt publishes). A second Ctrl-C stops at once, without the commit."""

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager

from job.errors import Interrupted, Preempted

log = logging.getLogger(__name__)

_requested = threading.Event()
_deferred = threading.Event()
_requested_at = [0.0]
_received = ["SIGTERM"]  # the first signal's name


class Stop(BaseException):
    """The signal outside training, raised wherever the main thread is: a BaseException, as KeyboardInterrupt is,
    so that no `except Exception` (the job's own around a file it reads, or a library's) takes it for a failure of
    what it interrupted. main() reports it as stopped()'s error."""


def install() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _on_signal(signum, frame) -> None:
    # Nothing here writes: the signal may come while this thread is inside a write to stderr, where a log line from
    # the handler fails ("reentrant call inside BufferedWriter") and is lost. A thread writes it once the handler
    # returns and the interrupted write is done.
    name, first = signal.Signals(signum).name, not _requested.is_set()
    if first:
        _requested_at[0], _received[0] = time.monotonic(), name
    elif "SIGINT" in (name, _received[0]):
        # A person who presses Ctrl-C again will not wait for the commit; nor after Ctrl-C under torchrun, which
        # passes a second Ctrl-C on to the ranks as SIGTERM. A second SIGTERM alone (Kubernetes) keeps committing.
        # os._exit, not an exception: the upload threads would hold the exit, and releasing the lease needs the
        # store; the next attempt takes the lease over once LEASE_SECONDS pass without renewal.
        _say(log.error, "%s after %s: stopped at once, without committing a checkpoint: the next attempt resumes from "
             "the last committed one once LEASE_SECONDS have passed", name, _received[0], then_exit=130)  # fmt: skip
        return
    _requested.set()
    if _deferred.is_set():
        if first:
            again = " (Ctrl-C again to stop at once, without it)" if name == "SIGINT" else ""
            _say(log.warning, "%s: stopping at the next step boundary to commit a checkpoint%s", name, again)
        return
    _say(log.warning, "%s: stopping now", name)
    raise Stop


def _say(level, message: str, *args, then_exit: int | None = None) -> None:
    """Logs from a new thread (then ends the process with then_exit, if given)."""

    def say():
        level(message, *args)
        if then_exit is not None:
            os._exit(then_exit)

    threading.Thread(target=say, name="signal").start()


def stopped(detail: str = "", **fields) -> Preempted:
    """The error that ends an attempt after the signal: "stopped by SIGINT" + detail, exit 130, or "stopped by
    SIGTERM" + detail, exit 143; fields go into failure.json."""
    kind = Interrupted if _received[0] == "SIGINT" else Preempted
    return kind(f"stopped by {_received[0]}{detail}", **fields)


def requested() -> bool:
    return _requested.is_set()


def seconds_since_request() -> float:
    return time.monotonic() - _requested_at[0] if _requested.is_set() else 0.0


@contextmanager
def deferred():
    """A signal only sets requested() inside: the trainer stops at its next step, and a commit under way finishes."""
    _deferred.set()
    try:
        yield
    finally:
        _deferred.clear()
