"""k8s/'s manifests, rendered by kustomize and read by the job's own settings: each variant's pod environment
is a valid configuration that does what the variant's comments say, and the Job's podFailurePolicy decides
every exit code the job has."""

import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from bench.multi_node import SWEEP, container, pod_environment, render
from job import errors, launch
from job.settings import read_settings
from tests.conftest import ROOT, Loopback

DATASET = [{"uri": "s3://my-bucket/datasets/alpaca.jsonl", "etag": "abc", "bytes": 1234}]


@pytest.fixture
def settings_of(monkeypatch, tmp_path):
    """read_settings() with exactly the given variables as the environment, and no .env."""
    monkeypatch.chdir(tmp_path)

    def read(env: dict):
        for name in list(os.environ):
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return read_settings()

    return read


@pytest.mark.parametrize("variant", ["k8s", "k8s/multi-gpu", "k8s/multi-node", "k8s/sweep", "k8s/kueue"])
def test_each_variant_names_its_run_after_the_job_and_runs_the_jobs_own_entry_point(variant, settings_of):
    docs = render(variant)
    env = pod_environment(docs)
    settings = settings_of(env)  # a misspelled or invalid variable would raise ConfigInvalid (78)
    assert "RUN_ID" not in env, "a fixed RUN_ID would give a changed configuration the old run's folder"
    assert docs["Job"]["metadata"]["name"] == settings.RUN_NAME
    assert settings.run_id(DATASET).startswith(settings.RUN_NAME + "-")
    # The image's entry point, not a torchrun command: the pod's exit code is the job's, for podFailurePolicy.
    assert "command" not in container(docs) and "args" not in container(docs)
    # multi-gpu and multi-node: the job starts torchrun itself, one process per GPU, and exits with rank 0's code.
    assert launch.wanted(settings) == (variant in ("k8s/multi-gpu", "k8s/multi-node"))
    assert ("gpu" if launch.wanted(settings) else "1") == settings.NPROC_PER_NODE
    grace = docs["Job"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    if launch.wanted(settings):  # torchrun must leave the ranks time to commit their checkpoint after SIGTERM
        assert int(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30)) < grace


def kustomize(variant: str) -> str:
    kubectl = str(Path(sys.executable).with_name("kubectl"))
    rendered = subprocess.run([kubectl, "kustomize", str(ROOT / variant)], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout


def test_k8s_job_yaml_is_the_base_rendered_and_applies_without_kustomize():
    """`kubectl apply -f k8s/job.yaml` deploys exactly what `kubectl apply -k k8s/` does (make k8s-render)."""
    header, _, body = (ROOT / "k8s" / "job.yaml").read_text().partition("\n---\n")
    assert body == kustomize("k8s"), "k8s/job.yaml is stale: run make k8s-render"
    assert all(line.startswith("#") for line in header.splitlines()) and "kubectl apply -f k8s/job.yaml" in header
    kinds = [doc["kind"] for doc in yaml.safe_load_all(body)]
    assert sorted(kinds) == ["ConfigMap", "Job", "ServiceAccount"]


# What kubectl's client-side dry run asks an API server: discovery, then each object (absent: it would be created).
SERVED = {"v1": {"ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps", "Secret": "secrets",
                 "Service": "services"}, "batch/v1": {"Job": "jobs"}}  # fmt: skip


@pytest.fixture(scope="module")
def api_server():
    """A stand-in for a cluster's API server (none can run here): it serves discovery for the kinds that a cluster
    without add-ons has, and answers 404 for every object, as an empty namespace does."""

    def resources(version: str) -> dict:
        listed = [{"name": name, "singularName": "", "namespaced": True, "kind": kind, "verbs": ["create", "get"]}
                  for kind, name in SERVED[version].items()]  # fmt: skip
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": version, "resources": listed}

    batch = {"groupVersion": "batch/v1", "version": "v1"}
    documents = {"/api": {"kind": "APIVersions", "versions": ["v1"]}, "/api/v1": resources("v1"),
                 "/apis": {"kind": "APIGroupList", "apiVersion": "v1",
                           "groups": [{"name": "batch", "versions": [batch], "preferredVersion": batch}]},
                 "/apis/batch/v1": resources("batch/v1")}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            found = documents.get(self.path.split("?")[0])
            body = json.dumps(found or {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                        "reason": "NotFound", "message": "not found"}).encode()  # fmt: skip
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with Loopback(Handler) as server:
        yield server.endpoint


@pytest.mark.parametrize("manifest", ["-f k8s/job.yaml", "-k k8s", "-k k8s/multi-gpu", "-k k8s/multi-node",
                                      "-k k8s/sweep", "-k k8s/kueue", "-f k8s/secret.example.yaml"])  # fmt: skip
def test_kubectl_apply_dry_run_accepts_every_manifest(api_server, manifest):
    """`kubectl apply --dry-run=client` as the README gives it (strict schema validation is make k8s-validate's)."""
    kubectl = str(Path(sys.executable).with_name("kubectl"))
    command = [kubectl, "apply", *manifest.split(), "--dry-run=client", "--validate=false", "--server", api_server]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"KUBECONFIG": ""})
    assert result.returncode == 0, result.stderr
    applied = result.stdout.splitlines()
    assert applied and all(line.endswith(" created (dry run)") for line in applied), result.stdout
    assert any(line.startswith("job.batch/") for line in applied) or "secret" in manifest


def test_kueue_variant_only_adds_the_queue_label():
    base, queued = render("k8s"), render("k8s/kueue")
    labels = queued["Job"]["metadata"]["labels"]
    assert labels.pop("kueue.x-k8s.io/queue-name") == "user-queue"
    assert queued == base


def test_multi_node_pods_meet_at_pod_0_as_consecutive_node_ranks(settings_of):
    docs = render("k8s/multi-node")
    job, service = docs["Job"], docs["Service"]
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes, "every node must run at once for the rendezvous"
    runs = set()
    for index in range(nodes):
        settings = settings_of(pod_environment(docs, index))
        assert (nodes, index, "gpu") == (settings.NNODES, settings.NODE_RANK, settings.NPROC_PER_NODE)
        runs.add(settings.run_id(DATASET))
        arguments = launch.arguments(settings)
        assert f"--rdzv-id={settings.RUN_NAME}" in arguments and f"--nnodes={nodes}" in arguments
    assert len(runs) == 1, "every node trains the same run"
    # Indexed pods are named <Job name>-<index> in the Service's subdomain; pod 0 hosts the rendezvous.
    host, port = settings.RDZV_ENDPOINT.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_sweep_indexes_are_distinct_runs_one_per_line(settings_of):
    docs = render("k8s/sweep")
    lines = [json.loads(line) for line in SWEEP.read_text().splitlines() if line.strip()]
    assert docs["Job"]["spec"]["completions"] == docs["Job"]["spec"]["parallelism"] == len(lines)
    runs = []
    for index, line in enumerate(lines):
        settings = settings_of(pod_environment(docs, index))
        assert all(getattr(settings, name) == value for name, value in line.items()), (index, line)
        runs.append(settings.run_id(DATASET))
    assert len(set(runs)) == len(lines), runs


def test_pod_failure_policy_decides_every_exit_code_of_the_job():
    policy = render("k8s")["Job"]["spec"]["podFailurePolicy"]["rules"]
    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, Exception)
             and hasattr(cls, "exit_code")}  # fmt: skip
    expected = {1: "Count", 65: "FailJob", 66: "FailJob", 70: "FailJob", 75: "Count", 77: "FailJob",
                78: "FailJob", 130: "Count", 143: "Ignore"}  # fmt: skip
    assert codes == set(expected), "a new exit code needs its podFailurePolicy decided here and in k8s/base/job.yaml"

    def decision(code: int) -> str:  # the first rule that matches decides; none: the failure counts
        for rule in policy:
            on = rule.get("onExitCodes")
            if on and (code in on["values"]) == (on["operator"] == "In"):
                return rule["action"]
        return "Count"

    assert {code: decision(code) for code in expected} == expected
    # Preemption, eviction and drain are never counted, whatever the exit code (137 after the grace period).
    assert policy[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
