"""k8s/multi-node on one machine: its two pods started as separate "nodes" by bench/multi_node.py, each with the pod's
command and environment (NODE_RANK from its completion index; pod 0's rendezvous address replaced by localhost) and
a scratch folder of its own, on CPU (gloo, one rank per node), against the S3 server."""

import json
import signal
import time

import pytest

from bench.multi_node import node_environments, render, start_nodes
from tests.conftest import free_port, job_environment, jsonl, put, read_objects

ROWS = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ["alpha", "bravo", "echo"] * 8]


@pytest.fixture
def nodes(tmp_path, s3_endpoint, s3, bucket, tiny_model_dir):
    """Starts both nodes with the manifest's environment and these settings; returns their exit codes and logs."""
    for path in tiny_model_dir.iterdir():
        put(s3, bucket, f"models/tiny/{path.name}", path.read_bytes())
    docs = render("k8s/multi-node")

    def run(settings: dict, stop_at: int | None = None) -> list[tuple[int, list[dict]]]:
        """stop_at: SIGTERM to both nodes once node 0 logs that step."""
        # NPROC_PER_NODE: the manifest's `gpu` (one rank per GPU) needs GPUs; here one rank per node.
        settings = {"BASE_MODEL": f"s3://{bucket}/models/tiny/", "OUTPUT_URI": f"s3://{bucket}/runs",
                    "NPROC_PER_NODE": "1", "TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false", "OPTIMIZER": "adamw_torch",
                    "MAX_STEPS": "4", "PER_DEVICE_BATCH_SIZE": "2", "GRAD_ACCUM_STEPS": "1", "PACKING": "false",
                    "NUM_SAMPLE_PROMPTS": "1", "MAX_NEW_TOKENS": "2", "CHECKPOINT_EVERY_STEPS": "0",
                    **settings}  # fmt: skip
        # Node 0's rendezvous on a free port rather than the manifest's: tests running beside these (pytest-xdist)
        # must not meet them there.
        port = free_port()
        envs = [env | {"RDZV_ENDPOINT": f"localhost:{port}"} for env in node_environments(docs, settings, tmp_path)]
        processes = start_nodes(envs, job_environment(tmp_path, s3_endpoint, {}), tmp_path / "logs", gpus=False)
        log_0, deadline = tmp_path / "logs" / "node-0.log", time.monotonic() + 300
        while stop_at and time.monotonic() < deadline and f'"step {stop_at}/' not in log_0.read_text():
            time.sleep(0.1)
        for process in processes if stop_at else []:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=600) for process in processes]
        logs = [(tmp_path / "logs" / f"node-{i}.log").read_text().splitlines() for i in range(len(processes))]
        return [(code, [json.loads(line) for line in log if line.startswith("{")]) for code, log in zip(codes, logs)]

    return run


def test_both_nodes_train_each_fetches_the_model_and_the_rows_and_rank_0_alone_publishes(nodes, s3, bucket, tmp_path):
    (code_0, log_0), (code_1, log_1) = nodes({"DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(ROWS))})
    assert (code_0, code_1) == (0, 0), (log_0[-3:], log_1[-3:])
    # Only rank 0 logs past the start (other ranks log warnings and errors); a world of 2 is both nodes in.
    assert [line["message"] for line in log_0 + log_1 if line["message"].startswith("rank ")] == [
        "rank 0 of 2 (local rank 0)"
    ]
    steps = [[line for line in log if line["message"].startswith("step ")] for log in (log_0, log_1)]
    assert sum(map(bool, steps)) == 1 and len(max(steps, key=len)) == 4, "rank 0 logs the steps of one run"
    publishers = [log for log in (log_0, log_1) if any(line["message"] == "publish: started" for line in log)]
    assert len(publishers) == 1, "rank 0 alone publishes"
    for node in ("node-0", "node-1"):  # each node's local rank 0 fetched the model to its own disk
        assert list((tmp_path / node).rglob("base_model/config.json")), f"{node} has no copy of the base model"
    # ... and the dataset, which it read into Arrow and tokenized there, once: no rank sends rows to another.
    for kind in ("dataset/d.jsonl", "data/rows-*/rows.json", "data/tokens-*/tokens.json"):
        found = [path.relative_to(tmp_path).parts for path in tmp_path.rglob(kind)]
        assert sorted(parts[0] for parts in found) == ["node-0", "node-1"], found
        assert len({parts[1:] for parts in found}) == 1, f"the nodes' {kind} differ in name: {found}"
    manifests = [key for key in read_objects(s3, bucket, "runs/") if key.endswith("/manifest.json")]
    assert len(manifests) == 1 and manifests[0].startswith("runs/finetune-"), manifests


def test_one_rank_per_node_reads_and_tokenizes_the_rows_and_the_other_maps_them(nodes, s3, bucket, tmp_path):
    """Two ranks per node: each node's local rank 0 reads the dataset into Arrow and tokenizes it; the other rank
    waits, then maps those files. Counted by datasets' progress bars, which text logs show, one per process that
    builds (transformers' weight-loading bar, one per rank, shows that both ranks ran)."""
    results = nodes({"DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(ROWS)), "NPROC_PER_NODE": "2",
                     "LOG_FORMAT": "text"})  # fmt: skip
    assert [code for code, _ in results] == [0, 0]
    for index in (0, 1):
        log = (tmp_path / "logs" / f"node-{index}.log").read_text()
        assert log.count("Loading weights:   0%") == 2, f"node {index} ran two ranks"
        built = log.count("Generating train split: 0 examples"), log.count("tokenize:   0%")
        assert built == (1, 1), f"node {index}: rows read {built[0]} times, tokenized {built[1]} times"


def test_a_dataset_error_exits_65_on_both_nodes(nodes, s3, bucket):
    results = nodes({"DATASET_URI": put(s3, bucket, "bad.jsonl", '{"text": "a"}\n{oops\n')})
    assert [code for code, _ in results] == [65, 65], [log[-2:] for _, log in results]


def test_a_checkpoint_holds_every_nodes_rng_state(nodes, s3, bucket, tmp_path):
    """Each node writes its ranks' RNG state into the checkpoint on its own disk; rank 0 uploads node 0's folder,
    which must carry node 1's state too, or node 1 resumes with a fresh one. Node 1's copy leaves its disk."""
    results = nodes({"DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(ROWS)), "RUN_ID": "rng", "MAX_STEPS": "200",
                     "CHECKPOINT_EVERY_STEPS": "50"}, stop_at=2)  # fmt: skip
    assert [code for code, _ in results] == [143, 143], [log[-2:] for _, log in results]
    objects = read_objects(s3, bucket, "runs/rng/checkpoints/")
    steps = {key.split("/")[3] for key in objects}
    assert len(steps) == 1, steps
    assert {key.rsplit("/", 1)[1] for key in objects if "/rng_state" in key} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not list((tmp_path / "node-1").rglob("checkpoint-*")), "node 1 keeps no checkpoint on its disk"
