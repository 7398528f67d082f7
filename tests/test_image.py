"""The built image runs the dry run as users run it: read-only root, uid 10001, only /tmp and /scratch writable.

Run it with `make image-cpu test-image`.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import CREDENTIALS, DEMO_DATA, ROOT, put, read_objects

IMAGE = os.environ.get("FINETUNE_IMAGE")
ENGINE = os.environ.get("CONTAINER_ENGINE", "podman")
ENGINE = shutil.which(ENGINE) or ENGINE
pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(not IMAGE, reason="set FINETUNE_IMAGE to an image built by `make image-cpu`"),
]


# As users run it: read-only root, uid 10001, only /tmp and /scratch writable.
LOCKED_DOWN = ("--read-only", "--user", "10001", "--tmpfs", "/tmp", "--tmpfs", "/scratch")


def run_command(*args: str, env: dict) -> list[str]:
    runtime = ["--runtime", "runc"] if os.path.basename(ENGINE) == "podman" else []
    flags = [f"--env={k}={v}" for k, v in env.items()]
    return [ENGINE, "run", *runtime, "--network", "host", *args, *flags, IMAGE]


def container(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(run_command("--rm", *args, env=env), capture_output=True, text=True, timeout=900)


def test_dry_run_in_the_image_read_only_as_uid_10001(s3, s3_endpoint, bucket):
    dataset = put(s3, bucket, "data/train.jsonl", DEMO_DATA.read_text())
    env = CREDENTIALS | {
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "DATASET_URI": dataset,
        "OUTPUT_URI": f"s3://{bucket}/runs",
        "DRY_RUN": "true",
        "EVAL_FRACTION": "0.05",
        "HF_HUB_OFFLINE": "1",
    }
    result = container(*LOCKED_DOWN, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    objects = read_objects(s3, bucket, "runs/")
    [manifest_key] = [k for k in objects if k.endswith("/manifest.json")]
    manifest = json.loads(objects[manifest_key])
    run = manifest_key.removesuffix("manifest.json")
    assert manifest["dry_run"] is True and manifest["status"] == "succeeded"
    assert manifest["image_version"] not in (None, "dev"), "the build records its version"
    files = {f["path"]: f for f in manifest["files"]}
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "report.md", "samples.jsonl"):
        assert files[name]["sha256"] == hashlib.sha256(objects[run + name]).hexdigest()
    assert json.loads(objects[run + "adapter/adapter_config.json"])["r"] == 16


def test_the_image_runs_as_10001_and_reports_configuration_errors(s3_endpoint):
    result = container("--read-only", "--tmpfs", "/tmp", env={"OUTPUT_URI": "/tmp/out", "LORA_R": "0"})
    assert result.returncode == 78
    assert "DATASET_URI is required" in result.stderr and "LORA_R" in result.stderr
    whoami = subprocess.run(
        [ENGINE, "image", "inspect", "--format", "{{.Config.User}}", IMAGE],
        capture_output=True,
        text=True,
    )
    assert whoami.stdout.strip() == "10001"


def test_the_base_job_pod_template_runs_as_written_in_podman(s3, s3_endpoint, bucket, tmp_path):
    """k8s/'s Job, rendered by kustomize, its pod template played by `podman kube play`: the same env,
    ConfigMap, securityContext and volumes; only the image, the data addresses and DRY_RUN change, and the
    pod joins the host's network to reach the local S3 server."""
    import yaml

    rendered = subprocess.run(
        [str(Path(sys.executable).with_name("kubectl")), "kustomize", str(ROOT / "k8s")], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered.stdout)}
    config, job = docs["ConfigMap"], docs["Job"]
    config["data"] |= CREDENTIALS | {
        "DATASET_URI": put(s3, bucket, "data/train.jsonl", DEMO_DATA.read_text()),
        "OUTPUT_URI": f"s3://{bucket}/runs",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "DRY_RUN": "true",
        "HF_HUB_OFFLINE": "1",
    }
    template = job["spec"]["template"]
    name = f"finetune-{bucket[:8]}"
    # What the Job controller adds to each pod it creates: the job-name label that RUN_ID reads.
    labels = template["metadata"]["labels"] | {"batch.kubernetes.io/job-name": name}
    spec = template["spec"] | {"hostNetwork": True}
    spec["containers"][0]["image"] = IMAGE
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels}, "spec": spec}
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    (tmp_path / "configmap.yaml").write_text(yaml.safe_dump(config))
    podman = ENGINE
    play = [podman, "kube", "play", "--runtime", "runc", "--configmap", str(tmp_path / "configmap.yaml")]
    started = subprocess.run([*play, str(tmp_path / "pod.yaml")], capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr
        ctr = f"{name}-finetune"
        waited = subprocess.run([podman, "wait", ctr], capture_output=True, text=True, timeout=900)
        logs = subprocess.run([podman, "logs", ctr], capture_output=True, text=True).stderr
        assert waited.stdout.strip() == "0", logs[-4000:]
        user = subprocess.run([podman, "inspect", "--format", "{{.Config.User}}", ctr], capture_output=True, text=True)
        assert user.stdout.strip().startswith("10001")
    finally:
        subprocess.run([podman, "kube", "down", str(tmp_path / "pod.yaml")], capture_output=True)
    objects = read_objects(s3, bucket, "runs/")
    [manifest_key] = [k for k in objects if k.endswith("/manifest.json")]
    run_id = json.loads(objects[manifest_key])["run_id"]
    # RUN_NAME comes from the Job's name through the downward API; the hash names what is trained.
    assert re.fullmatch(rf"{name}-[0-9a-f]{{12}}", run_id), run_id
    assert manifest_key == f"runs/{run_id}/manifest.json"
    assert json.loads(objects[manifest_key])["dry_run"] is True
    assert f"runs/{run_id}/adapter/adapter_model.safetensors" in objects


def test_sigterm_in_the_image_commits_a_checkpoint_and_exits_143_then_the_next_container_resumes(
    s3, s3_endpoint, bucket
):
    """`podman kill --signal TERM` reaches the job through tini as a kubelet's SIGTERM does: it stops at a step
    boundary, commits a checkpoint and exits 143; a new container (a replacement pod) resumes from it."""
    env = CREDENTIALS | {
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "DATASET_URI": put(s3, bucket, "data/train.jsonl", DEMO_DATA.read_text()),
        "OUTPUT_URI": f"s3://{bucket}/runs",
        "RUN_ID": "preempted",
        "DRY_RUN": "true",
        "DRY_RUN_STEPS": "40",
        "CHECKPOINT_EVERY_STEPS": "5",
        "LOG_FORMAT": "json",
        "HF_HUB_OFFLINE": "1",
    }
    name = f"finetune-sigterm-{uuid.uuid4().hex[:8]}"
    process = subprocess.Popen(
        run_command("--name", name, *LOCKED_DOWN, env=env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(900, lambda: subprocess.run([ENGINE, "kill", name], capture_output=True))
    watchdog.start()
    lines, killed = [], False
    try:
        for raw in process.stderr:
            lines.append(raw)
            if not killed and raw.startswith("{") and json.loads(raw)["message"].startswith("step 12/"):
                subprocess.run([ENGINE, "kill", "--signal", "TERM", name], check=True, capture_output=True)
                killed = True
        code = process.wait(timeout=60)
    finally:
        watchdog.cancel()
        subprocess.run([ENGINE, "rm", "--force", name], capture_output=True)
    assert killed and code == 143, "".join(lines[-20:])
    failure = json.loads(read_objects(s3, bucket, "runs/preempted/failure.json")["runs/preempted/failure.json"])
    assert failure["class"] == "preempted" and failure["exit_code"] == 143
    step = failure["step"]
    assert 12 <= step < 40 and f"runs/preempted/checkpoints/step-{step}/COMMITTED.json" in read_objects(
        s3, bucket, "runs/preempted/checkpoints/"
    )

    resumed = container(*LOCKED_DOWN, env=env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    logged = [json.loads(line) for line in resumed.stderr.splitlines() if line.startswith("{")]
    assert [line["resumed_from_step"] for line in logged if "resumed_from_step" in line] == [step]
    objects = read_objects(s3, bucket, "runs/preempted/")
    manifest = json.loads(objects.pop("runs/preempted/manifest.json"))
    assert manifest["dry_run"] is True and [a["resumed_from_step"] for a in manifest["attempts"]] == [None, step]
    for entry in manifest["files"]:
        body = objects[f"runs/preempted/{entry['path']}"]
        assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body) == entry["bytes"], entry["path"]
    assert "runs/preempted/failure.json" not in objects, "the attempt that completed the run removed it"
