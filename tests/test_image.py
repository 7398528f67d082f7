"""The built image runs the dry run as users run it: read-only root, uid 10001, only /tmp and /scratch writable.

Run it with `make image-cpu test-image`.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
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


def container(*args: str, env: dict) -> subprocess.CompletedProcess:
    runtime = ["--runtime", "runc"] if os.path.basename(ENGINE) == "podman" else []
    flags = [f"--env={k}={v}" for k, v in env.items()]
    return subprocess.run(
        [ENGINE, "run", "--rm", *runtime, "--network", "host", *args, *flags, IMAGE],
        capture_output=True,
        text=True,
        timeout=900,
    )


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
    result = container("--read-only", "--user", "10001", "--tmpfs", "/tmp", "--tmpfs", "/scratch", env=env)
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
    objects = read_objects(s3, bucket, f"runs/{name}/")
    manifest = json.loads(objects[f"runs/{name}/manifest.json"])
    assert manifest["run_id"] == name, "RUN_ID comes from the Job's name through the downward API"
    assert manifest["dry_run"] is True and f"runs/{name}/adapter/adapter_model.safetensors" in objects
