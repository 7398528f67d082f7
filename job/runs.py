"""A run's life in OUTPUT_URI/RUN_ID/: is it complete, is it the run these settings describe, and which
one attempt may write it now (a lease object taken with a conditional write, renewed while the attempt runs,
taken over only when its holder has gone silent). Every write of an attempt to the run's folder goes through
its Lease, which refuses once the attempt no longer holds the run."""

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from job.context import ATTEMPTS, CHECKPOINTS, CONFIG, FAILURE, LEASE, MANIFEST, Run
from job.errors import ConfigInvalid, TemporaryFailure, first_line
from job.settings import TRAINED
from job.storage import Storage, join

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
    """OUTPUT_URI/RUN_ID/lease.json, held by one attempt, and the gate that every write of that attempt under the
    run's folder passes through: config.json, attempts.json, checkpoints, the published files, failure.json.

    Margins, with S = LEASE_SECONDS: the holder rewrites lease.json every S/4, each write conditional on the version
    it wrote last. Another attempt takes the lease over once it has seen one version for S on its own clock, so that
    clocks need not agree. The holder trusts its hold for S/2 from sending the last write of it that landed; past
    that (the store unreachable, or another attempt's version found) the gate refuses every write and training stops
    with 75, at least S/2 before a taker can have seen the last version for S. A write the gate let through
    finishes within the store's timeouts (botocore: 10 s to connect, 120 s to read), so S/2 should exceed them when
    the network can hold a request that long."""

    def __init__(self, storage: Storage, out: str, seconds: int):
        self.storage, self.uri, self.seconds = storage, join(out, LEASE), seconds
        self.attempt = {"attempt": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}
        self._version: str | None = None
        self._confirmed = 0.0  # time.monotonic() when the last write of the lease that landed was sent
        self._lost: str | None = None  # why the hold ended before release, once it has
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)

    def _body(self) -> bytes:
        return json.dumps(self.attempt | {"renewed_at": now()}).encode()

    def _write(self, condition: dict) -> bool:
        sent = time.monotonic()
        version = self.storage.put_bytes(self._body(), self.uri, **condition)
        if version:
            self._version, self._confirmed = version, sent
        return bool(version)

    def acquire(self) -> None:
        """Takes the lease, waiting up to 1.5 x S for a silent holder's to go stale; else RunBusy (75)."""
        seen, deadline, waiting = None, time.monotonic() + self.seconds * 1.5, False
        while not self._write({"if_absent": True}):
            current = self.storage.get_bytes(self.uri)
            if current is None:
                continue  # released between the two requests
            holder, version = json.loads(current[0]), current[1]
            if seen is None or seen[0] != version:
                seen = (version, time.monotonic())
            elif time.monotonic() - seen[1] >= self.seconds:
                if self._write({"if_match": version}):
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
        self._renewer.start()

    def take_if_free(self) -> bool:
        """Takes the lease only if nobody holds it, without waiting or renewing (a failure.json to write on the way
        out of an attempt that never took it). release() gives it back."""
        return self._write({"if_absent": True})

    def _renew(self) -> None:
        due = self._confirmed
        while True:  # every S/4 from the start of the last try, not its end: a slow answer delays the next try less
            due += self.seconds / 4
            if self._stop.wait(max(0.0, due - time.monotonic())) or not self.held():
                return
            try:
                if not self._write({"if_match": self._version}):
                    self._lost = "another attempt took over this run"
                    log.error("%s: %s; this one stops", self.uri, self._lost)
            except Exception as exc:  # a passing storage fault: try again at the next renewal, while the hold lasts
                log.warning("%s: could not renew the lease (%s)", self.uri, first_line(exc, 200))

    def held(self) -> bool:
        """Whether this attempt still holds the run: its last renewal landed less than S/2 ago, and no other
        attempt's version was found. Once false, it stays false."""
        if self._lost is None and time.monotonic() - self._confirmed >= self.seconds / 2:
            self._lost = f"the lease could not be renewed for {self.seconds / 2:g} s (LEASE_SECONDS/2)"
        return self._lost is None

    def refusal(self) -> TemporaryFailure | None:
        """The error (75) that every write meets once this attempt no longer holds the run; None while it does."""
        if self.held():
            return None
        return TemporaryFailure(f"{self.uri}: {self._lost}: this attempt stopped and writes nothing more")

    def check(self) -> None:
        if error := self.refusal():
            raise error

    # The gate: the only writes of an attempt to the run's folder.
    def put_bytes(self, data: bytes, uri: str, if_absent: bool = False) -> bool:
        self.check()
        return bool(self.storage.put_bytes(data, uri, if_absent=if_absent))

    def put_tree(self, folder: Path, uri: str) -> None:
        self.check()
        self.storage.put_tree(folder, uri)

    def delete(self, uri: str) -> None:
        self.check()
        self.storage.delete(uri)

    def delete_tree(self, uri: str) -> None:
        self.check()
        self.storage.delete_tree(uri)

    def release(self) -> None:
        """Stops renewing and removes the lease if this attempt still holds it. Never raises and never waits on a
        store that does not answer: it runs on the way out of every attempt, failed ones included, and an
        unreachable store only delays the next attempt by S."""
        self._stop.set()
        if self._version is None or not self.held():
            return
        if self._renewer.is_alive():
            self._renewer.join(timeout=self.seconds / 4)  # a renewal under way; a slower one is left to the daemon
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


def record_attempt(lease: Lease, run: Run, attempt: dict) -> None:
    """Appends this attempt to the run's attempts.json."""
    every = [*attempts(lease.storage, run), attempt]
    lease.put_bytes(json.dumps(every, indent=1).encode() + b"\n", run.uri(ATTEMPTS))


def complete(storage: Storage, out: str, lease: Lease | None = None) -> bool:
    """Whether the run is complete (its manifest.json exists). If so, checkpoints that an attempt killed between its
    manifest and its clean-up left behind are removed, under this attempt's lease, or else under one taken only if
    nobody holds the run (its holder is cleaning up itself)."""
    if not storage.exists(join(out, MANIFEST)):
        return False
    if storage.list(join(out, CHECKPOINTS)):
        under(storage, out, lease, lambda held: held.delete_tree(join(out, CHECKPOINTS)))
    return True


def under(storage: Storage, out: str, lease: Lease | None, write) -> bool:
    """write(lease) under this attempt's lease, or, without one, under a lease taken only if nobody holds the run and
    released after; False when no lease could be had (another attempt holds the run)."""
    if lease is not None:
        write(lease)
        return True
    brief = Lease(storage, out, seconds=60)  # never renewed: the writes below take a few requests
    if not brief.take_if_free():
        return False
    try:
        write(brief)
    finally:
        brief.release()
    return True


def write_failure(storage: Storage, out: str, record: dict, lease: Lease | None) -> None:
    """failure.json, when this attempt may still write the run: under its lease while it holds it; without one
    (the attempt failed before taking it), only when nobody holds the run and it is not complete. Never raises: the
    store itself may be what failed."""
    uri, body = join(out, FAILURE), json.dumps(record, indent=2).encode() + b"\n"
    try:  # a lease no longer held refuses the write itself (Lease.check), and the refusal is logged below
        if lease is None and storage.exists(join(out, MANIFEST)):
            log.info("not writing %s: the run is complete", uri)
        elif not under(storage, out, lease, lambda held: held.put_bytes(body, uri)):
            log.info("not writing %s: another attempt holds the run", uri)
    except Exception as exc:
        log.warning("could not write %s: %s", uri, first_line(exc, 200))
