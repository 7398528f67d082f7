"""A run's lifecycle through the real entry point against the S3 server: SIGTERM and kill -9 at many points,
then resume, compared with an uninterrupted run; one writer per run; identity checks; storage faults.

Training is the hf backend on the tiny Llama (CPU, fixed seed), so that a resumed run can be compared with
an uninterrupted one number for number.
"""

import hashlib
import json
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors.torch

from tests.conftest import DEMO_DATA, error_line, jsonl, log_lines, put, read_objects

ROWS = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:48]
STEPS = 24
EVERY = 4  # CHECKPOINT_EVERY_STEPS
# Losses and LoRA weights of a resumed run against the uninterrupted one: the same arithmetic on the same
# rows in the same order gives the same float32 numbers on one machine; allow for reordered reductions.
TOLERANCE = 1e-5


@pytest.fixture
def train_env(s3, bucket, tiny_model_dir):
    """Real training of the tiny Llama: 24 optimizer steps of 2 x 2 rows, a checkpoint every 4 steps."""
    return {
        "BASE_MODEL": str(tiny_model_dir), "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(ROWS)),
        "OUTPUT_URI": f"s3://{bucket}/runs", "TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false",
        "OPTIMIZER": "adamw_torch", "MAX_STEPS": str(STEPS), "PER_DEVICE_BATCH_SIZE": "2", "GRAD_ACCUM_STEPS": "2",
        "LEARNING_RATE": "2e-3", "WARMUP_STEPS": "2", "CHECKPOINT_EVERY_STEPS": str(EVERY), "CHECKPOINT_KEEP": "2",
        "NUM_SAMPLE_PROMPTS": "1", "MAX_NEW_TOKENS": "2", "LEASE_SECONDS": "2",
    }  # fmt: skip


def watch(process: subprocess.Popen, when, sig=signal.SIGTERM, delay: float = 0.0) -> tuple[int, list[dict]]:
    """Reads the job's log lines as they come; the first time when(line) holds, sends sig (after delay s).
    Returns the exit code and every line."""
    lines, sent = [], False
    for raw in process.stderr:
        if not raw.startswith("{"):
            continue
        lines.append(json.loads(raw))
        if not sent and when(lines[-1]):
            sent = True
            threading.Timer(delay, lambda: process.poll() is None and process.send_signal(sig)).start()
    return process.wait(timeout=600), lines


def at_step(step: int):
    return lambda line: line["message"].startswith(f"step {step}/")


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


def test_sigterm_at_random_steps_resumes_to_the_uninterrupted_result(start_job, s3, bucket, train_env, reference):
    """Four runs, each stopped by SIGTERM five times (20 in all) and resumed: at random steps, right after a
    checkpoint step (its upload under way), inside gradient accumulation (the signal lands mid-step)."""

    def chain(index: int) -> list[tuple[int, int, int | None]]:
        rng, env, stops, step = random.Random(index), train_env | {"RUN_ID": f"sigterm-{index}"}, [], 0
        for _ in range(5):
            # Chain 0 signals at checkpoint steps, while that checkpoint uploads; the others anywhere.
            target = min(STEPS - 1, (step // EVERY + 1) * EVERY if index == 0 else step + rng.randint(1, 6))
            code, lines = watch(start_job(env), at_step(target), delay=rng.uniform(0, 0.05))
            assert code == 143, lines[-5:]
            failure = json.loads(read_objects(s3, bucket, f"runs/sigterm-{index}/failure.json").popitem()[1])
            assert failure["class"] == "preempted" and failure["exit_code"] == 143
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

    with ThreadPoolExecutor(4) as pool:
        chains = list(pool.map(chain, range(4)))
    assert sum(len(stops) for stops in chains) >= 16, chains
    for index in range(4):
        assert_same_run(outcome(s3, bucket, f"sigterm-{index}"), reference)
        objects = read_objects(s3, bucket, f"runs/sigterm-{index}/")
        manifest = json.loads(objects[f"runs/sigterm-{index}/manifest.json"])
        assert [a["resumed_from_step"] for a in manifest["attempts"]] == [None, *[s[1] for s in chains[index]]]
        assert f"runs/sigterm-{index}/failure.json" not in objects, "the attempt that completed removed it"
        assert not any("/checkpoints/" in key for key in objects), "checkpoints are deleted once complete"
        assert f"runs/sigterm-{index}/lease.json" not in objects
