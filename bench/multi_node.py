"""k8s/multi-node's pods as "nodes" on one host: each started with the pod's command (`python entrypoint.py`) and
the environment that the Indexed Job gives it (the ConfigMap, then the container's env with NODE_RANK from its
completion index), with pod 0's rendezvous address replaced by localhost and a scratch folder of its own, as a
node's disk; one GPU per node. Runs the same training on one GPU first, then prints the scaling.

    python bench/multi_node.py [--steps 20] [--shape llama-3-8b] [--rendered FILE] [--out bench-results]

FILE: `kubectl kustomize k8s/multi-node` saved elsewhere, for hosts without kubectl.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SWEEP = ROOT / "k8s" / "sweep" / "sweep.jsonl"


def render(variant: str, rendered: Path | None = None) -> dict:
    """The variant's objects by kind (kubectl kustomize, or a saved rendering); ConfigMap is the job's configuration
    (the sweep's is generated beside it)."""
    if rendered is None:
        kubectl = str(Path(sys.executable).with_name("kubectl"))
        result = subprocess.run([kubectl, "kustomize", str(ROOT / variant)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        text = result.stdout
    else:
        text = rendered.read_text()
    return {
        doc["kind"]: doc for doc in yaml.safe_load_all(text) if not doc["metadata"]["name"].startswith("finetune-sweep")
    }


def container(docs: dict) -> dict:
    return docs["Job"]["spec"]["template"]["spec"]["containers"][0]


def pod_environment(docs: dict, index: int = 0) -> dict:
    """The container's environment in the pod of completion index `index`: the ConfigMap, then env, with the
    downward API's values as the Job controller sets them (the Job's name, the index, the CPU request)."""
    job = docs["Job"]
    env = dict(docs["ConfigMap"]["data"])
    fields = {
        "metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
    }
    for var in container(docs).get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in source:
            env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:  # resourceFieldRef, divisor 1: whole CPUs, rounded up ("500m" is 1)
            kind, name = source["resourceFieldRef"]["resource"].split(".")
            quantity = str(container(docs)["resources"][kind][name])
            env[var["name"]] = str(-(-int(quantity[:-1]) // 1000) if quantity.endswith("m") else int(quantity))
    if job["spec"].get("completionMode") == "Indexed":
        env["JOB_COMPLETION_INDEX"] = str(index)
    if "SWEEP_FILE" in env:  # mounted from the ConfigMap that kustomize generates from this file
        env["SWEEP_FILE"] = str(SWEEP)
    return env


def node_environments(docs: dict, settings: dict, scratch: Path) -> list[dict]:
    """Each pod's environment with settings over the ConfigMap's, on this host: the rendezvous at localhost (pod 0
    hosts it), and a scratch folder per node."""
    nodes = []
    for index in range(docs["Job"]["spec"]["completions"]):
        env = pod_environment(docs, index) | settings
        port = env["RDZV_ENDPOINT"].rsplit(":", 1)[1]
        nodes.append(env | {"RDZV_ENDPOINT": f"localhost:{port}", "SCRATCH_DIR": str(scratch / f"node-{index}")})
    return nodes


def start_nodes(nodes: list[dict], base: dict, logs: Path, gpus: bool) -> list[subprocess.Popen]:
    """Every node's `python entrypoint.py` at once (with one GPU each when gpus), stderr to logs/node-N.log."""
    logs.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [sys.executable, str(ROOT / "entrypoint.py")],
            env=base | env | ({"CUDA_VISIBLE_DEVICES": str(index)} if gpus else {}),
            stdout=subprocess.DEVNULL,
            stderr=(logs / f"node-{index}.log").open("w"),
        )
        for index, env in enumerate(nodes)
    ]


def main() -> int:
    from bench.real_data import full_rows, steady_rate, train_steps, write
    from bench.synthetic_model import build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rendered", type=Path)
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    model = args.models / f"{args.shape}-4bit"
    if not (model / "config.json").is_file():
        build(args.shape, model, quantized=True)
    out = args.out / "multi-node"
    out.mkdir(parents=True, exist_ok=True)
    data = write(full_rows(400), out / "full.jsonl")
    settings = {"BASE_MODEL": str(model), "DATASET_URI": str(data), "OUTPUT_URI": str(out / "runs"),
                "MAX_STEPS": str(args.steps), "CHECKPOINT_EVERY_STEPS": "0", "NUM_SAMPLE_PROMPTS": "2",
                "MAX_NEW_TOKENS": "32", "LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    base = dict(os.environ)

    start = time.time()
    one = start_nodes([settings | {"RUN_ID": "one-gpu", "SCRATCH_DIR": str(out / "scratch-one")}], base, out / "one",
                      gpus=True)[0].wait()  # fmt: skip
    print(f"one GPU: exit {one} in {time.time() - start:.0f} s", flush=True)
    docs = render("k8s/multi-node", args.rendered)
    nodes = node_environments(docs, settings | {"RUN_ID": "two-nodes"}, out)
    start = time.time()
    codes = [process.wait() for process in start_nodes(nodes, base, out / "two", gpus=True)]
    print(f"two nodes: exits {codes} in {time.time() - start:.0f} s", flush=True)
    if one or any(codes):
        return 1
    single, both = (steady_rate(train_steps(out / "runs" / run)) for run in ("one-gpu", "two-nodes"))
    metrics = json.loads((out / "runs" / "two-nodes" / "metrics.json").read_text())
    print(f"| shape | GPUs | tokens/s steady | scaling |\n|---|---|---|---|\n| {args.shape} | 1 | {single:,.0f} | |\n"
          f"| {args.shape} | 2 nodes x 1 | {both:,.0f} | {both / (2 * single):.1%} |")  # fmt: skip
    print("two nodes:", json.dumps({k: metrics.get(k) for k in ("micro_batch", "grad_accum", "tokens", "steps")}))
    # A failure on one node (rank 0 reads the dataset) is the same classified exit on both.
    bad = out / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    failing = node_environments(docs, settings | {"DATASET_URI": str(bad)}, out)
    codes = [process.wait() for process in start_nodes(failing, base, out / "bad", gpus=True)]
    print(f"a bad dataset on two nodes: exits {codes} (65 expected on both)")
    return 0 if codes == [65, 65] else 1


if __name__ == "__main__":
    sys.exit(main())
