"""A run's life in OUTPUT_URI/RUN_ID/: is it complete, is it the run these settings describe, and which
one attempt may train and publish it now (a lease object taken with a conditional write, renewed while
the attempt runs, taken over only when its holder has gone silent)."""

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from job.context import ATTEMPTS, CONFIG, LEASE, Run
from job.errors import ConfigInvalid, TemporaryFailure, first_line
from job.settings import TRAINED
from job.storage import Storage

log = logging.getLogger(__name__)

DATASET_FILES = "DATASET_FILES"  # config.json's record of the dataset's identity


class RunBusy(TemporaryFailure):
    """Another attempt holds the run's lease and keeps renewing it."""


def check_same_run(storage: Storage, run: Run, config: dict) -> None:
    """ConfigInvalid naming every difference when the run's folder holds a run trained otherwise."""
    found = storage.get_bytes(run.uri(CONFIG))
    if found is None:
        return
    stored = json.loads(found[0])
    differences = [
        f"{name}={stored.get(name)!r} there, {config.get(name)!r} now"
        for name in sorted(TRAINED)
        if stored.get(name) != config.get(name)
    ]
    if stored.get(DATASET_FILES) != config.get(DATASET_FILES):
        before = {f["uri"]: f for f in stored.get(DATASET_FILES) or []}
        now = {f["uri"]: f for f in config.get(DATASET_FILES) or []}
        changed = sorted(u for u in before.keys() | now.keys() if before.get(u) != now.get(u))
        differences.append(f"the dataset's files differ ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})")
    if differences:
        raise ConfigInvalid(
            f"RUN_ID={run.id} already holds a run trained with other settings ({'; '.join(differences)}): "
            "choose a new RUN_ID, or unset it to name the run by a hash of its configuration"
        )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Lease:
    """OUTPUT_URI/RUN_ID/lease.json, held by one attempt. The holder rewrites it every seconds/4 (a write
    conditional on the version it wrote last); another attempt takes it over once it has seen the same
    version for `seconds`, measured on its own clock, so that clocks need not agree."""

    def __init__(self, storage: Storage, run: Run, seconds: int):
        self.storage, self.uri, self.seconds = storage, run.uri(LEASE), seconds
        self.attempt = {"attempt": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}
        self.lost = threading.Event()
        self._version: str | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)

    def _body(self) -> bytes:
        return json.dumps(self.attempt | {"renewed_at": now()}).encode()

    def acquire(self) -> None:
        """Takes the lease, waiting up to `seconds` for a silent holder's to go stale; else TemporaryFailure."""
        seen, deadline, waiting = None, time.monotonic() + self.seconds * 1.5, False
        while True:
            if self.storage.put_bytes(self._body(), self.uri, if_absent=True):
                break
            current = self.storage.get_bytes(self.uri)
            if current is None:
                continue  # released between the two requests
            holder, version = json.loads(current[0]), current[1]
            if seen is None or seen[0] != version:
                seen = (version, time.monotonic())
            elif time.monotonic() - seen[1] >= self.seconds:
                if self.storage.put_bytes(self._body(), self.uri, if_match=version):
                    log.warning("took over the run from attempt %s on %s, silent for %d s", holder["attempt"],
                                holder["host"], self.seconds)  # fmt: skip
                    break
                continue
            if time.monotonic() > deadline:
                raise RunBusy(
                    f"{self.uri}: attempt {holder['attempt']} on {holder['host']} is running this run (renewed at "
                    f"{holder['renewed_at']}): wait for it to finish, or give this one another RUN_ID"
                )
            if not waiting:
                waiting = True
                log.info("attempt %s on %s holds the run; waiting up to %d s for it to finish or go silent",
                         holder["attempt"], holder["host"], self.seconds)  # fmt: skip
            time.sleep(min(1.0, self.seconds / 4))
        self._version = self.storage.get_bytes(self.uri)[1]
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                if not self.storage.put_bytes(self._body(), self.uri, if_match=self._version):
                    log.error("%s: another attempt took over this run; this one stops", self.uri)
                    self.lost.set()
                    return
                self._version = self.storage.get_bytes(self.uri)[1]
            except Exception as exc:  # a passing storage fault: try again at the next renewal
                log.warning("%s: could not renew the lease (%s)", self.uri, first_line(exc, 200))

    def check(self) -> None:
        if self.lost.is_set():
            raise TemporaryFailure(f"{self.uri}: another attempt took over this run while this one ran")

    def release(self) -> None:
        """Stops renewing and removes the lease if it is still this attempt's. Never raises: it runs on the
        way out of every attempt, failed ones included, and an unreachable store only delays the next attempt
        by LEASE_SECONDS."""
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        if self._version is None or self.lost.is_set():
            return
        try:
            current = self.storage.get_bytes(self.uri)
            if current is not None and current[1] == self._version:
                self.storage.delete(self.uri)
        except Exception as exc:
            log.warning("%s: could not release the lease (%s)", self.uri, first_line(exc, 200))


def attempts(storage: Storage, run: Run) -> list[dict]:
    """The run's attempts so far (attempts.json), oldest first."""
    found = storage.get_bytes(run.uri(ATTEMPTS))
    return json.loads(found[0]) if found else []


def record_attempt(storage: Storage, run: Run, attempt: dict) -> None:
    """Appends this attempt to the run's attempts.json."""
    every = [*attempts(storage, run), attempt]
    storage.put_bytes(json.dumps(every, indent=1).encode() + b"\n", run.uri(ATTEMPTS))
