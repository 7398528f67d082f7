"""Only the attempt that holds a run's lease writes it (README: Runs), through the real entry point against the S3
server: two attempts of one RUN_ID in the three ways users start them, a holder cut off from the store while another
attempt takes over, rank 0's failures under torchrun, checkpoints that fail to commit, and failure.json for a
configuration error."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import test_lifecycle
from tests.conftest import error_line, jsonl, log_lines, put, read_objects
from tests.test_lifecycle import ROWS, outcome, watch

train_env = test_lifecycle.train_env  # the fixture: real training of the tiny Llama, a checkpoint every 4 steps


def trained(lines: list[dict]) -> bool:
    return any(line["message"] == "train: started" for line in lines)


def timed(process, when=lambda line: False) -> tuple[int, list[dict], float]:
    """watch(), and the time the process ended."""
    code, lines = watch(process, when, sig=None)
    return code, lines, time.time()


@pytest.mark.parametrize("way", ["two pods at once", "two containers sharing a scratch volume",
                                 "a second pod while the first trains"])  # fmt: skip
def test_of_two_attempts_of_one_run_one_trains_and_the_other_writes_nothing(way, start_job, s3, bucket, train_env,
                                                                            tmp_path):  # fmt: skip
    """The second attempt waits for the lease (LEASE_SECONDS=20: up to 30 s), gets it once the first has published,
    released it and deleted its checkpoints, and finds the run complete."""
    env = train_env | {"RUN_ID": "twice", "LEASE_SECONDS": "20"}
    scratch = [{} if "scratch" in way else {"SCRATCH_DIR": str(tmp_path / f"pod-{i}")} for i in range(2)]
    started = threading.Event()

    def training(line):
        if line["message"] == "train: started":
            started.set()
        return False

    pool = ThreadPoolExecutor(2)
    first = pool.submit(watch, start_job(env | scratch[0]), training, None)
    if way == "a second pod while the first trains":
        assert started.wait(timeout=300), "the first attempt never started training"
    second = pool.submit(watch, start_job(env | scratch[1]), lambda line: False, None)
    (code_1, lines_1), (code_2, lines_2) = first.result(timeout=600), second.result(timeout=600)
    assert (code_1, code_2) == (0, 0), (lines_1[-3:], lines_2[-3:])
    assert trained(lines_1) != trained(lines_2), "exactly one attempt trains"
    waited = lines_2 if trained(lines_1) else lines_1
    assert any("holds the run; waiting" in line["message"] for line in waited)
    assert any("completed by another attempt while this one waited" in line["message"] for line in waited)
    objects = read_objects(s3, bucket, "runs/twice/")
    assert not {"runs/twice/failure.json", "runs/twice/lease.json"} & objects.keys()
    assert not any("/checkpoints/" in key for key in objects)
    outcome(s3, bucket, "twice")  # every published file matches the manifest
    assert len(json.loads(objects["runs/twice/attempts.json"])) == 1, "the waiting attempt recorded nothing"


def test_a_holder_cut_off_from_the_store_stops_with_75_before_another_attempt_takes_over(start_job, s3, bucket,
                                                                                        train_env, faulty_s3,
                                                                                        tmp_path):  # fmt: skip
    """The holder talks to the store through a proxy that starts black-holing every request (no answer, nothing
    forwarded) at step 2; a second attempt, which reaches the store, takes the lease over after LEASE_SECONDS. The
    holder's gate closes LEASE_SECONDS/2 after its last renewal landed: it stops with 75 before the takeover, and
    nothing but its lease renewals reaches the proxy after the cut."""
    env = train_env | {"RUN_ID": "cut-off", "MAX_STEPS": "300", "CHECKPOINT_EVERY_STEPS": "0", "LEASE_SECONDS": "6"}
    cut = threading.Event()

    def black_hole(line):
        if line["message"].startswith("step 2/"):
            faulty_s3.faults, faulty_s3.fault_rate = ("blackhole",), 1.0
            cut.requests = len(faulty_s3.requests)
            cut.set()
        return False

    holder = ThreadPoolExecutor(1).submit(
        timed,
        start_job(env | {"AWS_ENDPOINT_URL_S3": faulty_s3.endpoint, "SCRATCH_DIR": str(tmp_path / "a")}),
        black_hole,
    )
    assert cut.wait(timeout=300), "the holder never reached step 2"
    code, lines, _ = timed(start_job(env | {"SCRATCH_DIR": str(tmp_path / "b")}))
    assert code == 0, lines[-3:]
    took_over = next(line["time"] for line in lines if line["message"].startswith("took over the run"))
    held_code, held_lines, held_ended = holder.result(timeout=60)
    assert held_code == 75, held_lines[-3:]
    assert (
        "lease could not be renewed for 3 s" in [line for line in held_lines if line["level"] == "error"][-1]["message"]
    )
    assert held_ended < took_over, "the holder stopped before the takeover"
    after = faulty_s3.requests[cut.requests :]
    assert after and all(request.startswith("PUT /") and "/lease.json" in request for request in after), after
    outcome(s3, bucket, "cut-off")
    attempts = json.loads(read_objects(s3, bucket, "runs/cut-off/attempts.json").popitem()[1])
    assert [a["resumed_from_step"] for a in attempts] == [None, None]


def rank_errors(lines: list[dict]) -> dict[str, int]:
    """Each rank's logged error code, by rank ("rank 0", "rank 1")."""
    return {line["stage"].split(", ")[-1]: line["exit_code"] for line in lines if "exit_code" in line}


def test_rank_0_failing_in_the_model_download_or_the_lease_stops_every_rank_with_its_code(run_job, s3, bucket,
                                                                                         train_env):  # fmt: skip
    """NPROC_PER_NODE=2: rank 0's failure is every rank's, at once, instead of the other rank waiting in a collective
    until the process group times out (30 minutes with gloo)."""
    env = train_env | {"NPROC_PER_NODE": "2"}
    start = time.monotonic()
    missing = run_job(env | {"RUN_ID": "no-model", "BASE_MODEL": f"s3://{bucket}/models/none/"})
    assert missing.returncode == 66, missing.stderr[-3000:]
    assert rank_errors(log_lines(missing)) == {"rank 0": 66, "rank 1": 66}
    assert time.monotonic() - start < 120

    stop = threading.Event()

    def renew():
        put(s3, bucket, "runs/busy/lease.json", json.dumps({"attempt": "other", "host": "elsewhere",
                                                            "renewed_at": time.time()}))  # fmt: skip

    def hold():  # another attempt, alive: it rewrites its lease every half second
        while not stop.wait(0.5):
            renew()

    renew()
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        start = time.monotonic()
        busy = run_job(env | {"RUN_ID": "busy", "LEASE_SECONDS": "2"})
    finally:
        stop.set()
        holder.join()
    assert busy.returncode == 75, busy.stderr[-3000:]
    assert "is running this run" in error_line(busy)
    assert rank_errors(log_lines(busy)) == {"rank 0": 75, "rank 1": 75}
    assert time.monotonic() - start < 120
    assert set(read_objects(s3, bucket, "runs/busy/")) == {"runs/busy/lease.json"}, "the busy run's folder untouched"


def test_checkpoints_failing_twice_in_a_row_stop_training_with_75_and_leave_no_folder(start_job, s3, bucket,
                                                                                      train_env, faulty_s3,
                                                                                      tmp_path):  # fmt: skip
    """Every request under checkpoints/ fails (500): the first failure is tried again with the next checkpoint, the
    second stops training within a step, with failure.json, and no checkpoint folder stays on scratch."""
    faulty_s3.faults, faulty_s3.fault_rate, faulty_s3.only = ("500",), 1.0, "/checkpoints/"
    env = train_env | {"RUN_ID": "unsaved", "AWS_ENDPOINT_URL_S3": faulty_s3.endpoint, "CHECKPOINT_EVERY_STEPS": "2",
                       "MAX_STEPS": "100"}  # fmt: skip
    code, lines, _ = timed(start_job(env))
    assert code == 75, lines[-3:]
    warnings = [line for line in lines if "was not committed" in line["message"]]
    # Uploads run behind training: under load a third checkpoint can be queued before step-4's upload gives up.
    assert [w["message"].split()[1] for w in warnings[:2]] == ["step-2", "step-4"], warnings
    assert "the next checkpoint tries again" in warnings[0]["message"]
    assert all("training stops" in w["message"] for w in warnings[1:]), warnings
    steps_after = [line for line in lines[lines.index(warnings[1]) :] if line["message"].startswith("step ")]
    assert len(steps_after) <= 1, "training stopped within a step of the second failure"
    failure = json.loads(read_objects(s3, bucket, "runs/unsaved/failure.json").popitem()[1])
    assert failure["exit_code"] == 75 and "step-2 and step-4 could not be committed" in failure["message"]
    assert not list((tmp_path / "scratch").rglob("checkpoint-*")), "every checkpoint folder left scratch"


def test_a_configuration_error_writes_failure_json_when_the_runs_folder_is_known(run_job, s3, bucket):
    env = {"DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(ROWS[:8])), "OUTPUT_URI": f"s3://{bucket}/runs",
           "RUN_ID": "x", "LEARNING_RATE": "abc", "DRY_RUN": "true"}  # fmt: skip
    result = run_job(env)
    assert result.returncode == 78 and "LEARNING_RATE" in error_line(result)
    objects = read_objects(s3, bucket, "runs/x/")
    failure = json.loads(objects.pop("runs/x/failure.json"))
    assert failure["exit_code"] == 78 and failure["class"] == "config_invalid" and "LEARNING_RATE" in failure["message"]
    assert not objects, "the lease taken to write it is given back"
    complete = run_job(env | {"LEARNING_RATE": "2e-4"})
    assert complete.returncode == 0, complete.stderr[-3000:]
    again = run_job(env)
    assert again.returncode == 78
    assert "runs/x/failure.json" not in read_objects(s3, bucket, "runs/x/"), "a complete run is never written again"


def test_lease_margins_renew_at_a_quarter_close_the_gate_at_a_half_before_a_takeover(faulty_s3, s3_endpoint, bucket,
                                                                                     monkeypatch):  # fmt: skip
    """LEASE_SECONDS=4: renewals every 1 s; once the store stops answering the holder, its gate closes within 2 s of
    its last renewal that landed, and the taker, which reaches the store, gets the lease 4 s after it first saw
    that version: after the gate closed."""
    from job.runs import Lease
    from tests.test_storage import storage_for

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    out = f"s3://{bucket}/runs/margins"
    holder = Lease(storage_for(faulty_s3.endpoint), out, seconds=4)
    holder.acquire()
    time.sleep(2.2)
    renewals = [r for r in faulty_s3.requests if r.startswith("PUT /") and r.endswith("/lease.json")]
    assert len(renewals) == 3, renewals  # the take and two renewals
    holder.put_bytes(b"{}", f"{out}/config.json")
    faulty_s3.faults, faulty_s3.fault_rate = ("blackhole",), 1.0
    cut = time.monotonic()
    taker = Lease(storage_for(s3_endpoint), out, seconds=4)
    closed = []

    def watch_gate():
        while holder.held():
            time.sleep(0.01)
        closed.append(time.monotonic())

    watcher = threading.Thread(target=watch_gate)
    watcher.start()
    taker.acquire()
    taken = time.monotonic()
    watcher.join(timeout=5)
    assert closed and closed[0] - cut <= 2.0 + 0.2, "the gate closes LEASE_SECONDS/2 after the last renewal landed"
    assert taken - cut >= 4.0 and closed[0] < taken, (closed, cut, taken)
    with pytest.raises(Exception, match="could not be renewed for 2 s") as refused:
        holder.put_bytes(b"{}", f"{out}/config.json")
    assert refused.value.exit_code == 75
    holder.release()  # returns at once: it no longer holds the lease, and the store does not answer it
    assert time.monotonic() - taken < 1.0
    taker.release()


def test_a_holder_whose_lease_was_taken_over_stops_writing_at_its_next_renewal(s3_endpoint, bucket):
    from job.runs import Lease
    from tests.test_storage import storage_for

    out = f"s3://{bucket}/runs/taken"
    storage = storage_for(s3_endpoint)
    holder = Lease(storage, out, seconds=4)
    holder.acquire()
    storage.put_bytes(b'{"attempt": "other", "host": "elsewhere", "renewed_at": "now"}', f"{out}/lease.json")
    time.sleep(1.2)  # one renewal, which finds another attempt's version
    assert not holder.held()
    with pytest.raises(Exception, match="another attempt took over this run"):
        holder.put_bytes(b"{}", f"{out}/config.json")
    holder.release()
    assert json.loads(storage.get_bytes(f"{out}/lease.json")[0])["attempt"] == "other", "the other's lease stays"
