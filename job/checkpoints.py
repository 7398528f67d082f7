"""Checkpoints in object storage: the trainer's whole checkpoint folder (adapter, optimizer, scheduler, RNG,
trainer state, and the step log so far) goes to OUTPUT_URI/RUN_ID/checkpoints/step-N/, and a marker listing
every file with its sha256 is written after them. Only a checkpoint with its marker counts, and only one
whose files match their marker is resumed from.

Uploads run in a background thread, so training goes on while the files travel; the newest CHECKPOINT_KEEP
committed checkpoints are kept, older ones deleted once a newer marker has landed.
"""

import json
import logging
import queue
import re
import shutil
import threading
import time
from pathlib import Path

from job.context import CHECKPOINTS, MARKER, Run
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
    storage.fetch_tree(uri, folder)
    (folder / MARKER).unlink(missing_ok=True)
    if describe_tree(folder) != marker["files"]:  # the same files, sizes and hashes, in the same order
        log.warning("checkpoint step-%d does not match its marker: not resuming from it", step)
        return None
    return folder


def newest(storage: Storage, run: Run) -> tuple[int, Path] | tuple[None, None]:
    """The newest committed checkpoint that downloads intact, as (step, local folder)."""
    for step in reversed(committed_steps(storage, run)):
        folder = restore(storage, run, step)
        if folder is not None:
            return step, folder
    return None, None


class Uploader:
    """Commits checkpoint folders to the run's checkpoints/ one after another, in a background thread."""

    def __init__(self, storage: Storage, run: Run, keep: int):
        self.storage, self.run, self.keep = storage, run, keep
        self.committed: list[int] = []  # steps this attempt committed
        self.seconds: list[float] = []  # upload time per checkpoint
        self.error: Exception | None = None
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="checkpoint-upload", daemon=True).start()

    def submit(self, folder: Path, step: int) -> None:
        self._queue.put((folder, step))

    def drain(self) -> None:
        """Waits for every submitted checkpoint; raises the first upload error (75, 77, ...)."""
        self._queue.join()
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while True:
            folder, step = self._queue.get()
            try:
                if self.error is None:
                    self._commit(folder, step)
            except Exception as exc:  # raised in the main thread by drain()
                self.error = exc
            finally:
                self._queue.task_done()

    def _commit(self, folder: Path, step: int) -> None:
        start, uri = time.perf_counter(), self.run.uri(CHECKPOINTS, f"step-{step}")
        files = describe_tree(folder)
        self.storage.delete(join(uri, MARKER))  # a step committed before (by an attempt that went on): recommit
        self.storage.delete_tree(uri)  # and whatever an interrupted upload of this step left
        self.storage.put_tree(folder, uri)
        self.storage.put_bytes(json.dumps({"step": step, "files": files}, indent=1).encode(), join(uri, MARKER))
        self.committed.append(step)
        self.seconds.append(round(time.perf_counter() - start, 3))
        log.info("checkpoint step-%d committed to %s in %.1f s", step, uri, self.seconds[-1],
                 extra={"fields": {"checkpoint_step": step, "upload_seconds": self.seconds[-1]}})  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        for old in committed_steps(self.storage, self.run)[: -self.keep]:
            old_uri = self.run.uri(CHECKPOINTS, f"step-{old}")
            self.storage.delete(join(old_uri, MARKER))  # uncommitted first: no attempt resumes a half-deleted one
            self.storage.delete_tree(old_uri)
