"""Checkpoints in object storage: the trainer's whole checkpoint folder (adapter, optimizer, scheduler, RNG,
trainer state, and the step log so far) goes to OUTPUT_URI/RUN_ID/checkpoints/step-N/, and a marker listing
every file with its sha256 is written after them. Only a checkpoint with its marker counts, and only one
whose files match their marker is resumed from.

Uploads run in a background thread, so training goes on while the files travel; the newest CHECKPOINT_KEEP
committed checkpoints are kept, older ones deleted once a newer marker has landed. Two failed in a row stop training.
The first commit of an attempt logs the grace period that a SIGTERM needs (grace_period).
"""

import json
import logging
import math
import queue
import re
import shutil
import threading
import time
from pathlib import Path

from job.context import CHECKPOINTS, MARKER, Run
from job.errors import JobError, TemporaryFailure, first_line
from job.publish import describe_tree
from job.storage import Storage, join

log = logging.getLogger(__name__)

STEP = re.compile(r"^step-(\d+)/" + re.escape(MARKER) + "$")


def committed_steps(storage: Storage, run: Run) -> list[int]:
    """Steps of the committed checkpoints (those with a marker), oldest first."""
    return sorted(int(m[1]) for name in storage.list(run.uri(CHECKPOINTS)) if (m := STEP.match(name)))


def restore(storage: Storage, run: Run, step: int) -> Path | None:
    """Downloads checkpoint step-N into the trainer's checkpoint folder; None when its files do not match
    its marker (a store that lost or changed an object)."""
    uri = run.uri(CHECKPOINTS, f"step-{step}")
    marker = json.loads(storage.get_bytes(join(uri, MARKER))[0])
    folder = run.checkpoints / f"checkpoint-{step}"
    shutil.rmtree(folder, ignore_errors=True)
    storage.copy_tree(uri, folder)
    (folder / MARKER).unlink(missing_ok=True)
    if describe_tree(folder) != marker["files"]:  # the same files, sizes and hashes, in the same order
        log.warning("checkpoint step-%d does not match its marker: not resuming from it", step)
        return None
    return folder


def grace_period(step: float, save: float, upload: float) -> tuple[float, int]:
    """The seconds from a SIGTERM to its committed checkpoint, when it comes as a step begins (that step, its save,
    its upload), and a terminationGracePeriodSeconds that covers them: twice that, for a slower step or upload than
    these, and 10 s to write failure.json, release the lease and exit (2.8 s on the 8B shape, docs/benchmarks.md),
    rounded up to ten seconds."""
    needed = step + save + upload
    return round(needed, 1), 10 * math.ceil((2 * needed + 10) / 10)


def newest(storage: Storage, run: Run) -> tuple[int, Path] | tuple[None, None]:
    """The newest committed checkpoint that downloads intact, as (step, local folder)."""
    for step in reversed(committed_steps(storage, run)):
        folder = restore(storage, run, step)
        if folder is not None:
            return step, folder
    return None, None


class Uploader:
    """Commits checkpoint folders to the run's checkpoints/ one after another, in a background thread, through the
    attempt's lease. A checkpoint that fails to commit is tried again with the next one; two failures in a row make
    `broken` the error, and training stops with it at its next step. Every folder handed over leaves scratch,
    committed or not."""

    def __init__(self, lease, run: Run, keep: int):
        self.lease, self.run, self.keep = lease, run, keep
        self.committed: list[int] = []  # steps this attempt committed
        self.seconds: list[float] = []  # upload time per checkpoint
        self.error: Exception | None = None  # the last checkpoint's, until one commits
        self.failures: list[int] = []  # steps that failed since the last commit
        self.grace_needed: float | None = None  # grace_period at this attempt's first commit
        self.grace_to_set: int | None = None
        self.lagging = False  # a checkpoint was handed over while an earlier one still uploaded
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="checkpoint-upload", daemon=True).start()

    def submit(self, folder: Path, step: int, step_seconds: float, save_seconds: float) -> None:
        """step_seconds, save_seconds: the longest step so far and this checkpoint's save, which a SIGTERM waits for
        before the upload (grace_period)."""
        if self._queue.unfinished_tasks and not self.lagging:
            self.lagging = True
            log.warning("checkpoint step-%d waits for an upload still running: uploads take longer than the steps "
                        "between checkpoints, and a SIGTERM waits for every one queued: raise CHECKPOINT_EVERY_STEPS",
                        step)  # fmt: skip
        self._queue.put((folder, step, step_seconds, save_seconds))

    @property
    def broken(self) -> Exception | None:
        """After two checkpoints in a row failed to commit: the error to stop training with (75 for storage)."""
        if len(self.failures) < 2:
            return None
        if not isinstance(self.error, JobError) or self.error.exit_code != 75:
            return self.error
        return TemporaryFailure(
            f"checkpoints step-{self.failures[0]} and step-{self.failures[1]} could not be committed to "
            f"{self.run.uri(CHECKPOINTS)} ({first_line(self.error)}): training stopped rather than go on unsaved; "
            "the next attempt resumes from the last committed checkpoint"
        )

    def drain(self) -> None:
        """Waits for every submitted checkpoint; raises the last one's upload error (75, 77, ...)."""
        self._queue.join()
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while True:
            folder, step, step_seconds, save_seconds = self._queue.get()
            try:
                self._commit(folder, step)
                self.error, self.failures = None, []
                if self.grace_needed is None:
                    self._announce_grace(step_seconds, save_seconds, self.seconds[-1])
            except Exception as exc:  # raised in the main thread by drain(), or by training through broken
                self.error = exc
                self.failures.append(step)
                log.warning("checkpoint step-%d was not committed (%s): %s", step, first_line(exc, 200),
                            "training stops" if self.broken else "the next checkpoint tries again")  # fmt: skip
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                self._queue.task_done()

    def _announce_grace(self, step: float, save: float, upload: float) -> None:
        self.grace_needed, self.grace_to_set = grace_period(step, save, upload)
        fields = {"grace_period_needed_seconds": self.grace_needed, "step_seconds": round(step, 3),
                  "save_seconds": round(save, 3), "upload_seconds": round(upload, 3),
                  "termination_grace_period_seconds": self.grace_to_set}  # fmt: skip
        log.info("a SIGTERM needs about %.1f s to commit (a step of %.1f s, its save of %.1f s and an upload of %.1f "
                 "s): give the pod terminationGracePeriodSeconds of at least %d", self.grace_needed, step, save,
                 upload, self.grace_to_set, extra={"fields": fields})  # fmt: skip

    def _commit(self, folder: Path, step: int) -> None:
        start, uri, lease = time.perf_counter(), self.run.uri(CHECKPOINTS, f"step-{step}"), self.lease
        files = describe_tree(folder)
        lease.delete(join(uri, MARKER))  # a step committed before (by an attempt that went on): recommit
        lease.delete_tree(uri)  # and whatever an interrupted upload of this step left
        lease.put_tree(folder, uri)
        lease.put_bytes(json.dumps({"step": step, "files": files}, indent=1).encode(), join(uri, MARKER))
        self.committed.append(step)
        self.seconds.append(round(time.perf_counter() - start, 3))
        log.info("checkpoint step-%d committed to %s in %.1f s", step, uri, self.seconds[-1],
                 extra={"fields": {"checkpoint_step": step, "upload_seconds": self.seconds[-1]}})  # fmt: skip
        for old in committed_steps(lease.storage, self.run)[: -self.keep]:
            old_uri = self.run.uri(CHECKPOINTS, f"step-{old}")
            lease.delete(join(old_uri, MARKER))  # uncommitted first: no attempt resumes a half-deleted one
            lease.delete_tree(old_uri)
