"""A run's lifecycle through the real entry point against the S3 server: SIGTERM and kill -9 at many points,
then resume, compared with an uninterrupted run; one writer per run; identity checks; storage faults.

Training is the hf backend on the tiny Llama (CPU, fixed seed), so that a resumed run can be compared with
an uninterrupted one number for number.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import safetensors.torch

from tests.conftest import DEMO_DATA, ROOT, FaultyProxy, error_line, jsonl, log_lines, put, read_objects

ROWS = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:48]
STEPS = 24
EVERY = 4  # CHECKPOINT_EVERY_STEPS
# Losses and LoRA weights of a resumed run against the uninterrupted one: the same arithmetic on the same
# rows in the same order gives the same float32 numbers on one machine; allow for reordered reductions.
TOLERANCE = 1e-5


@pytest.fixture
def train_env(s3, bucket, tiny_model_dir):
    """Real training of the tiny Llama: 24 optimizer steps of 2 x 2 rows (unpacked), a checkpoint every 4 steps."""
    return {
        "BASE_MODEL": str(tiny_model_dir), "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(ROWS)),
        "OUTPUT_URI": f"s3://{bucket}/runs", "TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false",
        "OPTIMIZER": "adamw_torch", "MAX_STEPS": str(STEPS), "PER_DEVICE_BATCH_SIZE": "2", "GRAD_ACCUM_STEPS": "2",
        "LEARNING_RATE": "2e-3", "WARMUP_STEPS": "2", "CHECKPOINT_EVERY_STEPS": str(EVERY), "CHECKPOINT_KEEP": "2",
        "NUM_SAMPLE_PROMPTS": "1", "MAX_NEW_TOKENS": "2", "LEASE_SECONDS": "6",
        "PACKING": "false",  # a step of 4 short rows, not of 4 packed 2,048-token sequences: the chains stay fast
    }  # fmt: skip


def watch(
    process: subprocess.Popen, when, sig=signal.SIGTERM, delay: float = 0.0, everything: list | None = None
) -> tuple[int, list[dict]]:
    """Reads the job's log lines as they come; the first time when(line) holds, sends sig (after delay s;
    None sends nothing). Returns the exit code and every JSON line; everything gets every line of stderr."""
    lines, sent = [], False
    for raw in process.stderr:
        if everything is not None:
            everything.append(raw)
        if not raw.startswith("{"):
            continue
        lines.append(json.loads(raw))
        if not sent and when(lines[-1]):
            sent = True
            if sig is not None:
                threading.Timer(delay, lambda: process.poll() is None and process.send_signal(sig)).start()
    return process.wait(timeout=600), lines


def at_step(step: int):
    return lambda line: line["message"].startswith(f"step {step}/")


def grace_lines(lines: list[dict]) -> list[dict]:
    """The log lines that tell the grace period a SIGTERM needs (at an attempt's first commit)."""
    return [line for line in lines if line["message"].startswith("a SIGTERM needs about")]


def resumed_from(lines: list[dict]) -> int | None:
    return next((line["resumed_from_step"] for line in lines if "resumed_from_step" in line), None)


def outcome(s3, bucket: str, run_id: str) -> tuple[dict, list[dict]]:
    """The published adapter's weights and the train log of a complete run, checked against its manifest."""
    objects = read_objects(s3, bucket, f"runs/{run_id}/")
    manifest = json.loads(objects.pop(f"runs/{run_id}/manifest.json"))
    for entry in manifest["files"]:
        body = objects[f"runs/{run_id}/{entry['path']}"]
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["bytes"], entry["path"]
    weights = safetensors.torch.load(objects[f"runs/{run_id}/adapter/adapter_model.safetensors"])
    log = [json.loads(line) for line in objects[f"runs/{run_id}/train_log.jsonl"].decode().splitlines()]
    return weights, [row for row in log if "loss" in row]


def assert_same_run(resumed: tuple[dict, list[dict]], reference: tuple[dict, list[dict]]) -> None:
    (weights, log), (ref_weights, ref_log) = resumed, reference
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)), "every step once, none repeated or skipped"
    for row, ref in zip(log, ref_log):
        # The same tokens at every step: the same rows in the same order.
        assert row["tokens"] == ref["tokens"], (row, ref)
        assert abs(row["loss"] - ref["loss"]) <= TOLERANCE * max(1, abs(ref["loss"])), (row, ref)
    assert weights.keys() == ref_weights.keys()
    for name, value in weights.items():
        assert (value - ref_weights[name]).abs().max().item() <= TOLERANCE, name


def committed(s3, bucket: str, run_id: str) -> list[int]:
    """Steps whose marker exists, after checking that every marked checkpoint's files match the marker."""
    prefix = f"runs/{run_id}/checkpoints/"
    objects = read_objects(s3, bucket, prefix)
    steps = []
    for key, body in objects.items():
        if key.endswith("/COMMITTED.json"):
            marker, folder = json.loads(body), key.removesuffix("COMMITTED.json")
            for entry in marker["files"]:
                assert hashlib.sha256(objects[folder + entry["path"]]).hexdigest() == entry["sha256"], key
            steps.append(marker["step"])
    return sorted(steps)


@pytest.fixture
def reference(run_job, s3, bucket, train_env):
    """The uninterrupted run."""
    result = run_job(train_env | {"RUN_ID": "reference"})
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(s3, bucket, "reference")


def chains(count: int, chain) -> list:
    """chain(0), ..., chain(count - 1), side by side: each is a run that several processes take in turn."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(chain, range(count)))


def test_sigterm_at_random_steps_resumes_to_the_uninterrupted_result(start_job, s3, bucket, train_env, reference):
    """Four runs, each stopped by SIGTERM five times (20 in all) and resumed: at random steps, right after a
    checkpoint step (its upload under way), inside gradient accumulation (the signal lands mid-step)."""

    def chain(index: int) -> list[tuple[int, int, int | None]]:
        rng, env, stops, step = random.Random(index), train_env | {"RUN_ID": f"sigterm-{index}"}, [], 0
        for _ in range(5):
            # Chain 0 signals at checkpoint steps, while that checkpoint uploads; the others anywhere.
            target = min(STEPS - 1, (step // EVERY + 1) * EVERY if index == 0 else step + rng.randint(1, 2))
            code, lines = watch(start_job(env), at_step(target), delay=rng.uniform(0, 0.05))
            assert code == 143, lines[-5:]
            failure = json.loads(read_objects(s3, bucket, f"runs/sigterm-{index}/failure.json").popitem()[1])
            assert failure["class"] == "preempted" and failure["exit_code"] == 143
            assert 0 <= failure["seconds_after_signal"] < 60, failure
            assert failure["step"] >= target and failure["step"] in committed(s3, bucket, f"sigterm-{index}")
            stops.append((target, failure["step"], resumed_from(lines)))
            assert resumed_from(lines) == (stops[-2][1] if len(stops) > 1 else None)
            step = failure["step"]
            if step >= STEPS - 1:
                break
        code, lines = watch(start_job(env), lambda line: False)
        assert code == 0, lines[-5:]
        assert resumed_from(lines) == step
        return stops

    stopped = chains(4, chain)
    assert sum(len(stops) for stops in stopped) == 20, stopped
    for index in range(4):
        assert_same_run(outcome(s3, bucket, f"sigterm-{index}"), reference)
        objects = read_objects(s3, bucket, f"runs/sigterm-{index}/")
        manifest = json.loads(objects[f"runs/sigterm-{index}/manifest.json"])
        assert [a["resumed_from_step"] for a in manifest["attempts"]] == [None, *[s[1] for s in stopped[index]]]
        assert f"runs/sigterm-{index}/failure.json" not in objects, "the attempt that completed removed it"
        assert not any("/checkpoints/" in key for key in objects), "checkpoints are deleted once complete"
        assert f"runs/sigterm-{index}/lease.json" not in objects


def test_kill_9_during_checkpoint_uploads_never_resumes_an_unmarked_checkpoint(
    start_job, s3, bucket, train_env, reference
):
    """Two runs, each killed five times while a checkpoint uploads (right after a checkpoint step): every
    next attempt resumes from the newest checkpoint whose marker had landed, and the run completes as if
    never interrupted."""

    def chain(index: int) -> int:
        rng, run_id, kills = random.Random(10 + index), f"kill-upload-{index}", 0
        env, resumed = train_env | {"RUN_ID": run_id}, None
        while kills < 5:
            target = ((resumed or 0) // EVERY + 1) * EVERY
            code, lines = watch(start_job(env), at_step(target), signal.SIGKILL, delay=rng.uniform(0, 0.08))
            assert resumed_from(lines) == resumed
            if code == 0:
                break
            assert code == -signal.SIGKILL, lines[-5:]
            kills += 1
            marked = committed(s3, bucket, run_id)  # every marked checkpoint's files match its marker
            resumed = marked[-1] if marked else None
        code, lines = watch(start_job(env), lambda line: False)
        assert code == 0 and resumed_from(lines) == resumed, lines[-5:]
        return kills

    kills = chains(2, chain)
    assert sum(kills) == 10, kills
    for index in range(2):
        assert_same_run(outcome(s3, bucket, f"kill-upload-{index}"), reference)


def test_kill_9_during_publish_never_leaves_a_manifest_of_missing_or_changed_files(start_job, s3, bucket, train_env):
    """Ten kills while publishing (two chains side by side, each killing the attempts of a run in turn): a
    manifest, once written, lists exactly the objects there with their hashes; the next attempt resumes from
    the newest committed checkpoint and publishes."""

    def chain(index: int) -> int:
        rng, runs, kills, resumed = random.Random(20 + index), 0, 0, None
        while kills < 5:
            run_id = f"kill-publish-{index}-{runs}"
            code, lines = watch(start_job(train_env | {"RUN_ID": run_id}),
                                lambda line: line["message"] == "publish: started", signal.SIGKILL,
                                delay=rng.uniform(0, 0.25))  # fmt: skip
            assert resumed_from(lines) == resumed
            if code == 0:  # the kill came after the manifest, or found the run complete: take a new run
                outcome(s3, bucket, run_id)
                runs, resumed = runs + 1, None
                continue
            assert code == -signal.SIGKILL, lines[-5:]
            kills += 1
            if read_objects(s3, bucket, f"runs/{run_id}/manifest.json"):
                outcome(s3, bucket, run_id)  # every listed file is there with its hash
                runs, resumed = runs + 1, None
                continue
            marked = committed(s3, bucket, run_id)
            resumed = marked[-1] if marked else None
        code, lines = watch(start_job(train_env | {"RUN_ID": f"kill-publish-{index}-{runs}"}), lambda line: False)
        assert code == 0 and resumed_from(lines) == resumed, lines[-5:]
        outcome(s3, bucket, f"kill-publish-{index}-{runs}")
        return kills

    assert chains(2, chain) == [5, 5]


def test_a_run_id_trained_otherwise_is_a_configuration_error_naming_the_differences(run_job, s3, bucket):
    env = {"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(ROWS[:12])),
           "OUTPUT_URI": f"s3://{bucket}/runs", "RUN_ID": "mine"}  # fmt: skip
    assert run_job(env).returncode == 0
    put(s3, bucket, "runs/mine/checkpoints/step-2/optimizer.pt", "left by an attempt killed after its manifest")
    again = run_job(env | {"MAX_NEW_TOKENS": "7", "CHECKPOINT_EVERY_STEPS": "9", "LOG_FORMAT": "json"})
    assert again.returncode == 0 and "already complete" in again.stderr, "nothing that is trained changed"
    assert not read_objects(s3, bucket, "runs/mine/checkpoints/"), "leftover checkpoints are removed"
    changed = run_job(env | {"LORA_R": "8", "LEARNING_RATE": "1e-3"})
    assert changed.returncode == 78
    message = error_line(changed)
    assert "LORA_R=16 there, 8 now" in message and "LEARNING_RATE=0.0002 there, 0.001 now" in message
    assert "choose a new RUN_ID" in message
    put(s3, bucket, "d.jsonl", jsonl(ROWS[1:13]))  # the same key, new content
    assert "the dataset's files differ" in error_line(run_job(env))
    assert "runs/mine/failure.json" not in read_objects(s3, bucket, "runs/mine/"), "a complete run is never written"
    # Without RUN_ID the new content is a new run, not a conflict.
    fresh = run_job({k: v for k, v in env.items() if k != "RUN_ID"})
    assert fresh.returncode == 0, fresh.stderr[-3000:]


def test_the_output_is_checked_before_any_download(run_job, s3, bucket, tmp_path):
    dataset = put(s3, bucket, "d.jsonl", jsonl(ROWS[:8]))
    missing = run_job({"DRY_RUN": "true", "DATASET_URI": dataset, "OUTPUT_URI": "s3://no-such-bucket-q/runs"})
    assert missing.returncode == 66 and "no-such-bucket-q" in error_line(missing)
    assert not any(line["stage"] == "inputs" for line in log_lines(missing)), "no download before the output is known"
    (tmp_path / "a-file").write_text("x")
    as_file = run_job({"DRY_RUN": "true", "DATASET_URI": dataset, "OUTPUT_URI": str(tmp_path / "a-file")})
    assert as_file.returncode == 78 and "OUTPUT_URI" in error_line(as_file)


def test_transient_storage_faults_during_checkpoints_and_publish_are_retried(start_job, s3, bucket, train_env,
                                                                            faulty_s3):  # fmt: skip
    faulty_s3.fault_rate = 0.1
    env = train_env | {"RUN_ID": "faulty", "AWS_ENDPOINT_URL_S3": faulty_s3.endpoint, "AWS_MAX_ATTEMPTS": "10"}
    code, lines = watch(start_job(env), lambda line: False)
    assert code == 0, lines[-5:]
    assert sum(faulty_s3.faulted.values()) >= 10, faulty_s3.faulted
    assert any("/checkpoints/" in r and r.startswith("PUT") for r in faulty_s3.requests)
    outcome(s3, bucket, "faulty")


def test_persistent_storage_faults_during_training_exit_75(start_job, s3, bucket, train_env, faulty_s3):
    env = train_env | {"RUN_ID": "down", "AWS_ENDPOINT_URL_S3": faulty_s3.endpoint}

    def store_goes_down(line):
        if line["message"].startswith("step 2/"):
            faulty_s3.fault_rate = 1.0
        return False

    code, lines = watch(start_job(env), store_goes_down)
    assert code == 75, [line for line in lines if line["level"] != "info"][-3:]
    assert "after retries" in lines[-1]["message"] or "unreachable" in lines[-1]["message"], lines[-1]
    assert "manifest.json" not in str(read_objects(s3, bucket, "runs/down/"))


def test_torchrun_started_by_the_job_passes_on_exit_codes_and_sigterm(start_job, run_job, s3, bucket, train_env):
    """NPROC_PER_NODE=2: the job starts torchrun itself; a dataset error exits 65 (torchrun alone would exit 1);
    SIGTERM reaches both ranks, which stop at the same step; rank 0 commits the checkpoint; the container exits 143.
    (Resuming two CPU ranks trips transformers 5.17, which loads the optimizer onto "cpu:0": the GPU host runs
    that resume, docs/benchmarks.md.)"""
    bad = run_job({"DRY_RUN": "true", "NPROC_PER_NODE": "2", "OUTPUT_URI": f"s3://{bucket}/runs",
                   "DATASET_URI": put(s3, bucket, "bad.jsonl", '{"text": "a"}\n{oops\n')})  # fmt: skip
    assert bad.returncode == 65, bad.stderr[-3000:]
    env = train_env | {"RUN_ID": "ranks", "NPROC_PER_NODE": "2", "MAX_STEPS": "40"}
    code, lines = watch(start_job(env), at_step(6))
    assert code == 143, lines[-5:]
    failure = json.loads(read_objects(s3, bucket, "runs/ranks/failure.json").popitem()[1])
    assert failure["class"] == "preempted" and failure["step"] >= 6
    assert committed(s3, bucket, "ranks")[-1] == failure["step"]
    stops = [line for line in lines if line["message"].startswith("stopped by SIGTERM")]
    assert {line["stage"].split(", ")[-1] for line in stops} == {"rank 0", "rank 1"}, "both ranks stopped"


def test_sigterm_during_publish_leaves_no_manifest_and_the_next_attempt_publishes(start_job, s3, bucket, train_env):
    """With REPORT_TO=tensorboard: the attempt that publishes trained no step itself, and its TensorBoard events,
    carried in the checkpoint, still hold every step."""
    env = train_env | {"RUN_ID": "publish-stopped", "REPORT_TO": "tensorboard"}
    code, lines = watch(start_job(env), lambda line: line["message"] == "publish: started")
    assert code == 143, lines[-5:]
    objects = read_objects(s3, bucket, "runs/publish-stopped/")
    assert "runs/publish-stopped/manifest.json" not in objects
    assert json.loads(objects["runs/publish-stopped/failure.json"])["class"] == "preempted"
    assert committed(s3, bucket, "publish-stopped")[-1] == STEPS, "the final checkpoint is committed before publish"
    code, lines = watch(start_job(env), lambda line: False)
    assert code == 0 and resumed_from(lines) == STEPS, lines[-5:]
    outcome(s3, bucket, "publish-stopped")
    objects = read_objects(s3, bucket, "runs/publish-stopped/")
    events = {k: v for k, v in objects.items() if k.startswith("runs/publish-stopped/tensorboard/")}
    listed = {f["path"] for f in json.loads(objects["runs/publish-stopped/manifest.json"])["files"]}
    assert events and {k.removeprefix("runs/publish-stopped/") for k in events} <= listed
    log = objects["runs/publish-stopped/train_log.jsonl"].splitlines()
    losses = {row["step"]: row["loss"] for row in map(json.loads, log) if "loss" in row}
    assert tensorboard_scalars(events, "train/loss") == pytest.approx(losses, rel=1e-6)


def tensorboard_scalars(events: dict[str, bytes], tag: str) -> dict[int, float]:
    """The tag's values by step, from event files read back with TensorBoard's own reader."""
    import tempfile
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    with tempfile.TemporaryDirectory() as folder:
        for key, body in events.items():
            path = Path(folder) / key.rsplit("/", 1)[-1]
            path.write_bytes(body)
            reader = EventAccumulator(str(path))
            reader.Reload()
            if tag in reader.Tags()["scalars"]:
                values |= {event.step: event.value for event in reader.Scalars(tag)}
    return values


def test_wandb_and_mlflow_follow_the_run_across_attempts_and_never_see_a_secret(start_job, s3, bucket, train_env,
                                                                                 tmp_path, monkeypatch):  # fmt: skip
    """REPORT_TO=wandb,mlflow with the real clients (W&B offline, MLflow's local file store): an attempt stopped by
    SIGTERM and the one that resumes it log into one W&B run id and one MLflow run, both named RUN_ID, whose losses
    by step are train_log.jsonl's; the vendors' secrets appear in no log line, output or tracked value."""
    import mlflow

    canary = "canary-secret-0123456789abcdef0123456789abcdef01"  # 40+ characters: W&B's key length
    env = train_env | {"RUN_ID": "tracked", "REPORT_TO": "wandb,mlflow", "WANDB_MODE": "offline",
                       "WANDB_API_KEY": canary, "WANDB_PROJECT": "finetune", "WANDB_DIR": str(tmp_path / "wandb"),
                       "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
                       "MLFLOW_EXPERIMENT_NAME": "finetune", "MLFLOW_TRACKING_PASSWORD": canary}  # fmt: skip
    everything = []
    code, lines = watch(start_job(env), at_step(6), everything=everything)
    assert code == 143, lines[-5:]
    code, lines = watch(start_job(env), lambda line: False, everything=everything)
    assert code == 0 and resumed_from(lines) >= 6, lines[-5:]
    objects = read_objects(s3, bucket, "runs/tracked/")
    losses = {r["step"]: r["loss"] for r in map(json.loads, objects["runs/tracked/train_log.jsonl"].splitlines())
              if "loss" in r}  # fmt: skip
    assert sorted(losses) == list(range(1, STEPS + 1))

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store: mlflow-skinny has no database backend
    client = mlflow.MlflowClient((tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert [r.info.run_name for r in runs] == ["tracked"], "one MLflow run, named RUN_ID"
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert history == pytest.approx(losses, rel=1e-6)

    offline = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*-tracked/run-tracked.wandb"))
    assert len(offline) == 2, "one offline run per attempt, both with the run id RUN_ID"
    logged = {}
    for path in offline:  # read back with W&B's own reader
        wandb = Path(sys.executable).parent / "wandb"
        records = subprocess.run([wandb, "leet", "inspect", "--json", path], capture_output=True, text=True, check=True)
        for record in map(json.loads, filter(str.strip, records.stdout.splitlines())):
            item = record.get("history", {}).get("item", {})
            if "train/loss" in item:
                logged[item["train/global_step"]] = item["train/loss"]
    assert logged == pytest.approx(losses, rel=1e-6)

    tracked = [p.read_bytes() for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]
    tracked += [p.read_bytes() for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert canary not in "".join(everything) and canary not in str(read_objects(s3, bucket, "runs/tracked/"))
    assert not [blob for blob in tracked if canary.encode() in blob], "a secret reached a tracked file"


def test_two_transient_faults_on_every_request_are_carried_by_the_default_attempts(start_job, s3, bucket, train_env,
                                                                                    faulty_s3):  # fmt: skip
    """The store fails the first two attempts of every request (503 SlowDown, 500, a reset before or after it acted),
    as many times as a run asks it: the default three attempts carry each one, and the run completes."""
    faulty_s3.fail_first, faulty_s3.faults = 2, ("503", "500", "reset", "lost")
    env = train_env | {"RUN_ID": "two-faults", "AWS_ENDPOINT_URL_S3": faulty_s3.endpoint, "AWS_MAX_ATTEMPTS": None,
                       "MAX_STEPS": "4", "CHECKPOINT_EVERY_STEPS": "2", "LEASE_SECONDS": "60"}  # fmt: skip
    code, lines = watch(start_job(env), lambda line: False)
    assert code == 0, [line for line in lines if line["level"] != "info"][-3:]
    attempts = len(faulty_s3.requests)  # some 70 requests: more than a retry quota of ~40 would have carried
    assert attempts > 3 * 50 and faulty_s3.faulted.total() * 3 == attempts * 2, "every request failed twice"
    outcome(s3, bucket, "two-faults")


def test_ctrl_c_commits_and_exits_130_and_a_second_one_stops_at_once(start_job, s3, bucket, train_env, faulty_s3):
    """SIGINT (Ctrl-C) as SIGTERM: the step reached is committed, one error line, failure.json says interrupted, exit
    130, and the next attempt resumes from it. A second Ctrl-C stops at once, while the checkpoint's upload hangs.
    Never a traceback."""
    env, everything = train_env | {"RUN_ID": "ctrl-c", "MAX_STEPS": "8"}, []
    code, lines = watch(start_job(env), at_step(2), signal.SIGINT, everything=everything)
    assert code == 130, lines[-5:]
    failure = json.loads(read_objects(s3, bucket, "runs/ctrl-c/failure.json").popitem()[1])
    assert failure["class"] == "interrupted" and failure["exit_code"] == 130
    assert failure["step"] >= 2 and failure["step"] in committed(s3, bucket, "ctrl-c")
    errors = [line["message"] for line in lines if line["level"] == "error"]
    assert len(errors) == 1 and errors[0].startswith(f"stopped by SIGINT; the checkpoint of step {failure['step']}")
    assert len(grace_lines(lines)) == 1, "the stop's commit is the attempt's first: it tells the grace period"
    code, lines = watch(start_job(env), lambda line: False, everything=everything)
    assert code == 0 and resumed_from(lines) == failure["step"], lines[-5:]
    # The resumed attempt committed steps 4 and 8: the first tells the grace period once, as metrics.json and
    # the report do.
    [grace] = grace_lines(lines)
    objects = read_objects(s3, bucket, "runs/ctrl-c/")
    metrics = json.loads(objects["runs/ctrl-c/metrics.json"])
    assert metrics["grace_period_needed_seconds"] == grace["grace_period_needed_seconds"] > 0, grace
    assert grace["grace_period_needed_seconds"] == pytest.approx(
        grace["step_seconds"] + grace["save_seconds"] + grace["upload_seconds"], abs=0.06
    )
    assert grace["upload_seconds"] == metrics["checkpoint_upload_seconds"][0]
    to_set = grace["termination_grace_period_seconds"]
    assert metrics["termination_grace_period_seconds"] == to_set >= 2 * metrics["grace_period_needed_seconds"] + 10
    assert grace["message"].endswith(f"terminationGracePeriodSeconds of at least {to_set}")
    assert f"terminationGracePeriodSeconds of at least {to_set}." in objects["runs/ctrl-c/report.md"].decode()

    process = start_job(env | {"RUN_ID": "ctrl-c-twice", "AWS_ENDPOINT_URL_S3": faulty_s3.endpoint})

    def twice(line):  # the first Ctrl-C at step 2, the second once the job has heard the first
        if at_step(2)(line):
            faulty_s3.only, faulty_s3.faults, faulty_s3.fault_rate = "/checkpoints/", ("blackhole",), 1.0
            process.send_signal(signal.SIGINT)
        return line["message"].startswith("SIGINT: stopping at the next step boundary")

    code, lines = watch(process, twice, signal.SIGINT, everything=everything)
    assert code == 130, lines[-5:]
    assert [line["message"].split(":")[0] for line in lines if line["level"] == "error"] == ["SIGINT after SIGINT"]
    assert "Traceback" not in "".join(everything)


class SlowStore(FaultyProxy):
    """The S3 server 100 ms away, as a real store is farther than loopback: a transfer's threads then overlap."""

    def fault(self, path: str, headers) -> None:
        time.sleep(0.1)


def test_a_resumed_run_says_nothing_of_a_full_connection_pool_or_a_dataset_without_length(start_job, s3_endpoint,
                                                                                          train_env):  # fmt: skip
    """A resume downloads its checkpoint's dozen files at once (from a store 100 ms away, where botocore's default
    pool of 10 made urllib3 log "Connection pool is full" for 2 or 3 of them) and trains past the end of the resumed
    epoch (step 12), where accelerate logged "The used dataset had no length" at each of TRL's metric gathers."""
    env, everything = train_env | {"RUN_ID": "quiet-resume"}, []
    code, _ = watch(start_job(env), at_step(3))
    assert code == 143
    with SlowStore(s3_endpoint) as store:
        resumed = start_job(env | {"AWS_ENDPOINT_URL_S3": store.endpoint})
        code, lines = watch(resumed, at_step(13), everything=everything)
    assert code == 143 and resumed_from(lines) >= 3, lines[-5:]
    assert "Connection pool is full" not in "".join(everything)
    assert "The used dataset had no length" not in "".join(everything)


def test_checkpoints_that_come_faster_than_they_upload_are_said_once_and_all_committed(start_job, s3_endpoint,
                                                                                       train_env):  # fmt: skip
    """A checkpoint every step of a tiny model, to a store 100 ms away: each upload takes longer than the steps between
    checkpoints, so they queue, and a SIGTERM would wait for all of them: one warning names the setting to raise."""
    env = train_env | {"RUN_ID": "lagging", "CHECKPOINT_EVERY_STEPS": "1", "MAX_STEPS": "5", "CHECKPOINT_KEEP": "5"}
    with SlowStore(s3_endpoint) as store:
        code, lines = watch(start_job(env | {"AWS_ENDPOINT_URL_S3": store.endpoint}), lambda line: False, None)
    assert code == 0, lines[-5:]
    lagging = [line["message"] for line in lines if "waits for an upload still running" in line["message"]]
    assert len(lagging) == 1 and "raise CHECKPOINT_EVERY_STEPS" in lagging[0], lagging
    committed = [line for line in lines if line["message"].startswith("checkpoint step-")]
    assert [line["message"].split()[1] for line in committed if "committed to" in line["message"]] == [
        f"step-{n}" for n in range(1, 6)
    ]


SIGNAL_DURING_A_WRITE = """
import logging, sys
from job import logs, preemption
logs.setup("json")
preemption.install()
with preemption.deferred():
    print("ready", flush=True)
    for n in range(2000):  # 200 kB: the pipe fills, and a write waits in the kernel when the signal comes
        logging.getLogger("job.train").info("line %d %s", n, "x" * 100)
    print("requested" if preemption.requested() else "not requested", flush=True)
"""


def test_a_signal_during_a_blocked_write_to_stderr_still_gets_its_line():
    """SIGTERM while the job's write to stderr waits on a full pipe (a slow log reader): the handler's write there
    failed ("reentrant call inside BufferedWriter"), losing the line that tells the step boundary is awaited."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stderr buffered, as in a container
    child = subprocess.Popen([sys.executable, "-c", SIGNAL_DURING_A_WRITE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout.readline() == "ready\n"
    wchan = Path(f"/proc/{child.pid}/wchan")
    for _ in range(600):  # until the child has filled the pipe's 64 kB and waits in the kernel
        if "pipe_write" in wchan.read_text():
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and out == "requested\n", err[-2000:]
    assert "Logging error" not in err and "Traceback" not in err, err[-2000:]
    warnings = [json.loads(raw)["message"] for raw in err.splitlines() if '"level": "warning"' in raw]
    assert warnings == ["SIGTERM: stopping at the next step boundary to commit a checkpoint"], err[-2000:]


def test_sigterm_while_the_rows_are_read_is_a_preemption_not_a_bad_dataset(start_job, train_env, tmp_path):
    """SIGTERM outside training raises where the main thread is; while it read the dataset, that was inside the
    reader's `except Exception` (for a file that pandas, pyarrow or gzip cannot read) and the datasets builder's,
    which made the preemption a DatasetGenerationError, exit 1: a failure that a Job's podFailurePolicy ends."""
    rows = tmp_path / "many.jsonl"
    rows.write_text(jsonl([{"instruction": f"say {n}", "input": "", "output": f"{n} {n}"} for n in range(300_000)]))
    code, lines = watch(start_job(train_env | {"RUN_ID": "stop-reading", "DATASET_URI": str(rows)}),
                        lambda line: line["message"].startswith("dataset format:"), delay=0.3)  # fmt: skip
    errors = [line["message"] for line in lines if line["level"] == "error"]
    assert code == 143, errors
    assert errors == ["stopped by SIGTERM outside training: the next attempt resumes from the last checkpoint"]


def test_a_first_step_that_does_not_come_is_said_with_where_the_main_thread_waits(tmp_path, caplog):
    """Training that has ended no step `wait` seconds after it began (a compile that never ends: Gemma 3's masks on
    torch 2.11 kept a pod silent for minutes) logs where the main thread is, by package, once; a step ends the watch."""
    from types import SimpleNamespace

    from job import train

    state = SimpleNamespace(global_step=0, max_steps=3, num_input_tokens_seen=0)

    def compiling_the_first_step(seconds: float) -> None:
        time.sleep(seconds)

    stalled = train.step_logger(tmp_path / "train_log.jsonl", True, None, wait=0.2)
    with caplog.at_level("WARNING", logger="job.train"):
        stalled.on_train_begin(None, state, None)
        compiling_the_first_step(0.6)
        stalled.on_step_end(None, state, None)
        stalled.on_train_end(None, state, None)
    [said] = [r.getMessage() for r in caplog.records if "no training step has ended" in r.getMessage()]
    assert "ended 0.2 s after training began; the main thread is at " in said, said
    innermost, entered = said.split(" is at ")[1].split(" <- ")[:2]
    assert innermost.endswith(" compiling_the_first_step") and entered.endswith(" " + sys._getframe().f_code.co_name)

    caplog.clear()
    quick = train.step_logger(tmp_path / "quick.jsonl", True, None, wait=0.2)
    with caplog.at_level("WARNING", logger="job.train"):
        quick.on_train_begin(None, state, None)
        quick.on_step_end(None, state, None)
        time.sleep(0.4)
        quick.on_train_end(None, state, None)
    assert not [r for r in caplog.records if "no training step has ended" in r.getMessage()]
