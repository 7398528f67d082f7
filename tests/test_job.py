"""The real entry point, run as a subprocess against the local S3 server, checked by what it wrote."""

import gzip
import hashlib
import io
import json
import re
import signal
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch

from tests.conftest import DEMO_DATA, Loopback, error_line, free_port, jsonl, log_lines, put, read_objects

DEMO_ROWS = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
OUTPUTS = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
           "samples.jsonl", "metrics.json", "train_log.jsonl", "loss.png", "report.md", "config.json",
           "manifest.json"}  # fmt: skip


def chats(n=40):
    return [{"conversations": [{"from": "system", "value": "Answer briefly."},
                               {"from": "human", "value": r["instruction"] + " " + r["input"]},
                               {"from": "gpt", "value": r["output"]}]} for r in DEMO_ROWS[:n]]  # fmt: skip


def as_bytes(rows, kind: str) -> bytes:
    if kind == "jsonl":
        return jsonl(rows).encode()
    if kind == "json":
        return json.dumps(rows).encode()
    if kind == "jsonl.gz":
        return gzip.compress(jsonl(rows).encode())
    buffer = io.BytesIO()
    if kind == "parquet":
        pd.DataFrame(rows).to_parquet(buffer)
    else:
        pd.DataFrame(rows).to_csv(buffer, index=False, compression={"method": "gzip"} if kind == "csv.gz" else None)
    return buffer.getvalue()


FORMATS = {
    "alpaca": (DEMO_ROWS[:40], "jsonl", "object"),
    "sharegpt": (chats(), "json", "prefix"),
    "messages": ([{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant",
                  "content": r["output"]}]} for r in DEMO_ROWS[:40]], "parquet", "object"),
    "prompt_completion": ([{"prompt": r["instruction"] + "\n", "completion": r["output"]} for r in DEMO_ROWS[:40]],
                          "csv.gz", "prefix"),
    "text": ([{"text": f"{r['instruction']} {r['input']} {r['output']}"} for r in DEMO_ROWS[:40]], "jsonl.gz",
             "prefix"),
}  # fmt: skip


def run_outputs(s3, bucket: str, result) -> tuple[str, dict[str, bytes]]:
    assert result.returncode == 0, result.stderr[-4000:]
    objects = read_objects(s3, bucket, "runs/")
    [run_id] = {key.split("/")[1] for key in objects}
    return run_id, {key.split("/", 2)[2]: body for key, body in objects.items()}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dry_run_publishes_the_full_layout_for_every_format(run_job, s3, bucket, fmt):
    rows, kind, layout = FORMATS[fmt]
    half = len(rows) // 2
    if layout == "object":
        dataset = put(s3, bucket, f"data/train.{kind}", as_bytes(rows, kind))
    else:  # two files and a non-data object under a prefix
        put(s3, bucket, f"data/part-0.{kind}", as_bytes(rows[:half], kind))
        put(s3, bucket, f"data/part-1.{kind}", as_bytes(rows[half:], kind))
        put(s3, bucket, "data/_SUCCESS", b"")
        dataset = f"s3://{bucket}/data/"
    result = run_job({"DRY_RUN": "true", "DATASET_URI": dataset, "OUTPUT_URI": f"s3://{bucket}/runs",
                      "EVAL_FRACTION": "0.1", "NUM_SAMPLE_PROMPTS": "3", "MAX_NEW_TOKENS": "8"})  # fmt: skip
    run_id, files = run_outputs(s3, bucket, result)
    assert files.keys() >= OUTPUTS
    manifest = json.loads(files["manifest.json"])
    assert manifest["dry_run"] is True and manifest["run_id"] == run_id and manifest["status"] == "succeeded"
    assert manifest["dataset"]["format"] == fmt and manifest["dataset"]["rows"] == len(rows)
    assert len(manifest["dataset"]["files"]) == (1 if layout == "object" else 2)
    samples = [json.loads(line) for line in files["samples.jsonl"].decode().splitlines()]
    assert len(samples) == 3 and all({"prompt", "response", "base_response", "reference"} <= s.keys() for s in samples)
    metrics = json.loads(files["metrics.json"])
    assert metrics["steps"] == 3 and metrics["eval_loss"] > 0 and metrics["tokens"] > 0
    # PACKING=true: the hf backend's padding-free rows, told apart by position_ids (test_kernels.py); TRL's warning
    # of "cross-contamination between samples" on any attention but flash-attn's is not passed on (logs.DISPROVED).
    assert metrics["attention"] == manifest["training"]["attention"] == "SDPA with a block-diagonal mask"
    assert "cross-contamination" not in result.stderr and "Padding-free training is enabled" not in result.stderr
    assert set(metrics["seconds_per_stage"]) == {"resume", "inputs", "data", "model", "train", "samples"}
    assert f"{fmt}" in files["report.md"].decode() and files["loss.png"].startswith(b"\x89PNG")
    steps = [json.loads(line) for line in files["train_log.jsonl"].decode().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]


def test_manifest_hashes_match_the_objects(run_job, s3, bucket):
    dataset = put(s3, bucket, "d/train.jsonl", jsonl(DEMO_ROWS[:30]))
    _, files = run_outputs(s3, bucket, run_job({"DRY_RUN": "true", "DATASET_URI": dataset,
                                                "OUTPUT_URI": f"s3://{bucket}/runs"}))  # fmt: skip
    manifest = json.loads(files.pop("manifest.json"))
    listed = {f["path"]: f for f in manifest["files"]}
    assert listed.keys() == files.keys()
    for name, body in files.items():
        assert listed[name]["bytes"] == len(body) and listed[name]["sha256"] == hashlib.sha256(body).hexdigest()
    assert manifest["dataset"]["files"][0]["sha256"] == hashlib.sha256(jsonl(DEMO_ROWS[:30]).encode()).hexdigest()
    assert {"torch", "transformers", "trl", "peft"} <= manifest["libraries"].keys()


def test_rerun_of_a_complete_run_exits_at_once_and_writes_nothing(run_job, s3, bucket):
    env = {"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:20])),
           "OUTPUT_URI": f"s3://{bucket}/runs"}  # fmt: skip
    run_outputs(s3, bucket, run_job(env))
    before = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    again = run_job(env)
    assert again.returncode == 0
    assert "already complete" in again.stderr
    assert not any(line["stage"] == "train" for line in log_lines(again))
    assert {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == before


def test_a_restarted_attempt_reuses_its_rows_and_tokens_and_a_dry_run_labels_its_estimates(
    start_job, run_job, s3, bucket, tmp_path
):
    """A dry run of more rows than it tokenizes (data.DRY_RUN_ROWS: 2,000) estimates the length counts from those, and
    says so; stopped by SIGTERM after its first step, the next attempt on the same scratch volume reads and tokenizes
    nothing again, and resumes."""
    rows = [{**DEMO_ROWS[i % len(DEMO_ROWS)], "input": f"(#{i})"} for i in range(2100)]
    env = {"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(rows)), "RUN_ID": "restarted",
           "OUTPUT_URI": f"s3://{bucket}/runs"}  # fmt: skip
    first = start_job(env)
    for line in first.stderr:
        if '"message": "step 1/3 loss' in line:
            first.send_signal(signal.SIGTERM)
            break
    first.communicate(timeout=120)
    assert first.returncode == 143
    [tokens] = (tmp_path / "scratch" / "restarted" / "data").glob("tokens-*/tokens.json")
    written = tokens.stat().st_mtime_ns
    result = run_job(env)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = [line["message"] for line in log_lines(result)]
    assert any(m.startswith(f"inputs: reusing the rows of {env['DATASET_URI']} read by an earlier attempt from ")
               for m in messages)  # fmt: skip
    assert f"data: reusing the tokenized rows of an earlier attempt from {tokens.parent}" in messages
    assert not any(m.endswith(" rows from 1 file(s)") for m in messages) and tokens.stat().st_mtime_ns == written
    assert [line["resumed_from_step"] for line in log_lines(result) if "resumed_from_step" in line] in ([1], [2])
    [counted] = [m for m in messages if "longer than MAX_SEQ_LENGTH" in m]
    assert counted.endswith(" of 2100 training rows are longer than MAX_SEQ_LENGTH=2048 (estimated from 2000 of them)")
    _, files = run_outputs(s3, bucket, result)
    dataset = json.loads(files["manifest.json"])["dataset"]
    assert (dataset["rows"], dataset["train_rows"], dataset["truncated_rows_estimated_from"]) == (2100, 2100, 2000)
    assert "(estimated from 2000 rows: a dry run tokenizes a sample)" in files["report.md"].decode()


def test_a_run_that_failed_then_succeeds_keeps_no_failure_record(run_job, s3, bucket):
    env = {"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:12])),
           "SAMPLE_PROMPTS_URI": f"s3://{bucket}/prompts.jsonl", "OUTPUT_URI": f"s3://{bucket}/runs",
           "RUN_ID": "retried"}  # fmt: skip
    assert run_job(env).returncode == 66
    assert "runs/retried/failure.json" in read_objects(s3, bucket, "runs/")
    put(s3, bucket, "prompts.jsonl", jsonl([{"prompt": "Hi"}]))  # the user uploads the prompts; the Job retries
    result = run_job(env)
    assert result.returncode == 0, result.stderr[-3000:]
    objects = read_objects(s3, bucket, "runs/")
    assert "runs/retried/manifest.json" in objects and "runs/retried/failure.json" not in objects


def test_real_cpu_training_from_an_s3_model_learns(run_job, s3, bucket, tiny_model_dir, tmp_path):
    """The hf backend trains for real (30 steps, LoRA on the tiny Llama fetched from s3://); loss falls."""
    for path in tiny_model_dir.iterdir():
        put(s3, bucket, f"models/tiny/{path.name}", path.read_bytes())
    rows = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in
            ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"] * 8]  # fmt: skip
    result = run_job({
        "BASE_MODEL": f"s3://{bucket}/models/tiny/", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(rows)),
        "OUTPUT_URI": f"s3://{bucket}/runs", "TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false",
        "OPTIMIZER": "adamw_torch", "MAX_STEPS": "30", "LEARNING_RATE": "3e-3", "PER_DEVICE_BATCH_SIZE": "8",
        "GRAD_ACCUM_STEPS": "1", "WARMUP_STEPS": "2", "EVAL_FRACTION": "0.125", "LORA_R": "8", "LORA_ALPHA": "32",
    })  # fmt: skip
    _, files = run_outputs(s3, bucket, result)
    metrics = json.loads(files["metrics.json"])
    assert metrics["steps"] == 30
    assert metrics["final_loss"] < 0.3 * metrics["first_loss"], metrics
    assert json.loads(files["manifest.json"])["dry_run"] is False
    assert json.loads(files["manifest.json"])["dataset"]["truncated_rows_estimated_from"] is None, "every row counted"
    assert json.loads(files["manifest.json"])["base_model"]["loaded"].endswith("base_model")
    weights = _safetensors(files["adapter/adapter_model.safetensors"])
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b), "LoRA B starts at zero and must have moved"
    assert not any("lora" not in name for name in weights), "only adapter weights are saved"
    config = json.loads(files["adapter/adapter_config.json"])
    assert config["r"] == 8 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"}  # fmt: skip
    # The adapter names the base as the user gave it (not the job's scratch folder), carries a real model card,
    # and loads with peft alone onto a copy of that base.
    assert config["base_model_name_or_path"] == f"s3://{bucket}/models/tiny/"
    card = files["adapter/README.md"].decode()
    assert "More Information Needed" not in card and f"s3://{bucket}/models/tiny/" in card
    for text in ("PeftModel.from_pretrained", "FastLanguageModel.from_pretrained", "LoRARequest", "../report.md",
                 f"{metrics['final_loss']:.4g}", f"{metrics['eval_loss']:.4g}", "| LORA_R | `8` |"):  # fmt: skip
        assert text in card, text
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, body in files.items():
        if name.startswith("adapter/"):
            (adapter / name.removeprefix("adapter/")).write_bytes(body)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 17]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, adapter)
    assert not torch.allclose(tuned(ids).logits, before, atol=1e-4), "the loaded adapter changes the model"


def _safetensors(body: bytes) -> dict:
    return safetensors.torch.load(body)


def test_local_paths_and_env_file(run_job, tmp_path, tiny_model_dir):
    """Local dataset, model and output; settings from .env, with the real environment winning."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text(jsonl(DEMO_ROWS[:24]))
    (tmp_path / ".env").write_text(
        f"DATASET_URI={tmp_path / 'data'}\nOUTPUT_URI={tmp_path / 'out'}\nBASE_MODEL={tiny_model_dir}\n"
        "DRY_RUN=true\nRUN_ID=from-file\nLORA_R=4\nDRY_RUN_STEPS=2\n"
    )
    result = run_job({"LORA_R": "6"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "from-file"
    assert {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()} >= OUTPUTS
    config = json.loads((run / "config.json").read_text())
    assert (config["LORA_R"], config["RUN_ID"], config["MAX_STEPS"]) == (6, "from-file", 2)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 6
    # A small local model is trained as it is, not replaced by a tiny random one.
    assert json.loads((run / "manifest.json").read_text())["base_model"]["loaded"] == str(tiny_model_dir)


def test_sample_prompts_come_from_sample_prompts_uri(run_job, s3, bucket):
    prompts = put(s3, bucket, "prompts.jsonl", jsonl([{"prompt": "What is 2 + 2?", "reference": "4"},
                                                      {"prompt": "Name a colour."}]))  # fmt: skip
    result = run_job(
        {
            "DRY_RUN": "true",
            "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:20])),
            "OUTPUT_URI": f"s3://{bucket}/runs",
            "SAMPLE_PROMPTS_URI": prompts,
            "MAX_NEW_TOKENS": "4",
        }
    )
    _, files = run_outputs(s3, bucket, result)
    samples = [json.loads(line) for line in files["samples.jsonl"].decode().splitlines()]
    assert [(s["prompt"], s["reference"]) for s in samples] == [("What is 2 + 2?", "4"), ("Name a colour.", None)]
    assert "### Instruction:\nWhat is 2 + 2?" in samples[0]["input"]


def bad_runs(s3, bucket, tmp_path):
    ok = put(s3, bucket, "ok.jsonl", jsonl(DEMO_ROWS[:10]))
    out = f"s3://{bucket}/runs"
    (tmp_path / "notes.txt").write_text("not data")
    bad_json = put(s3, bucket, "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    bad_columns = put(s3, bucket, "cols.jsonl", jsonl([{"question": "?", "answer": "!"}]))
    wrong_format = put(s3, bucket, "fmt.jsonl", jsonl(DEMO_ROWS[:3]))
    return {
        65: [
            ({"DATASET_URI": bad_json}, "bad.jsonl:2: invalid JSON"),
            ({"DATASET_URI": bad_columns}, "cannot tell the format"),
            ({"DATASET_URI": wrong_format, "DATASET_FORMAT": "messages"}, "fmt.jsonl:1"),
        ],
        66: [
            ({"DATASET_URI": f"s3://{bucket}/missing.jsonl"}, "no such object, and no data files"),
            ({"DATASET_URI": "s3://no-such-bucket-zz/d.jsonl"}, "does not exist"),
            ({"DATASET_URI": str(tmp_path)}, "no data files"),
            ({"DATASET_URI": ok, "BASE_MODEL": "/models/absent"}, "BASE_MODEL=/models/absent: no such directory"),
        ],
        75: [({"DATASET_URI": ok, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}, "unreachable after retries")],
        78: [
            ({"DATASET_URI": None}, "DATASET_URI is required"),
            ({"DATASET_URI": ok, "LORA_R": "-1", "PACKING": "perhaps"}, "LORA_R"),
            ({"DATASET_URI": ok, "SCRATCH_DIR": "/dev/null/scratch"}, "SCRATCH_DIR=/dev/null/scratch is not writable"),
            ({"DATASET_URI": ok, "DRY_RUN": "false"}, "no NVIDIA GPU is visible (on a GPU machine: `docker run "
             "--gpus all`, the pod's nvidia.com/gpu limit, an R580 or newer driver: README, GPU drivers); "
             "LOAD_IN_4BIT=true needs an NVIDIA GPU"),
            ({"DATASET_URI": ok, "LORA_TARGET_MODULES": "q_proj,attn_x"}, "LORA_TARGET_MODULES: attn_x not in"),
            ({"DATASET_URI": ok, "DRY_RUN": "false", "TRAIN_BACKEND": "unsloth", "LOAD_IN_4BIT": "false",
              "OPTIMIZER": "adamw_torch"}, "TRAIN_BACKEND=unsloth needs an NVIDIA GPU"),
        ],
    }, out  # fmt: skip


@pytest.mark.parametrize("code", [65, 66, 75, 78])
def test_bad_inputs_exit_with_their_code_and_one_clear_line(run_job, s3, bucket, tmp_path, code):
    cases, out = bad_runs(s3, bucket, tmp_path)
    assert len(cases[code]) >= 2 or code == 75
    for i, (env, expected) in enumerate(cases[code]):
        # A run of its own for each case: one RUN_ID with another dataset would be a 78 (test_lifecycle).
        result = run_job({"DRY_RUN": "true", "OUTPUT_URI": out, "RUN_ID": f"case-{i}"} | env)
        assert result.returncode == code, (env, result.stderr[-3000:])
        message = error_line(result)
        assert expected in message and "\n" not in message, (env, message)
        assert "Traceback" not in result.stderr
        if code in (65, 66):
            failure = read_objects(s3, bucket, f"runs/case-{i}/failure.json")
            assert failure, "failure.json is written when the output is reachable"
            record = json.loads(failure.popitem()[1])
            assert record["exit_code"] == code and record["message"] == message


def test_unreachable_storage_while_connections_drop_is_temporary(run_job, tmp_path):
    from tests.test_storage import closing_server

    endpoint, stop = closing_server()
    try:
        result = run_job({"DRY_RUN": "true", "DATASET_URI": "s3://b/d.jsonl", "OUTPUT_URI": "s3://b/runs",
                          "AWS_ENDPOINT_URL_S3": endpoint})  # fmt: skip
    finally:
        stop.set()
    assert result.returncode == 75 and "unreachable after retries" in error_line(result)


def test_denied_credentials_exit_77(run_job, tmp_path):
    from tests.conftest import start_moto

    server, endpoint = start_moto(INITIAL_NO_AUTH_ACTION_COUNT="2")
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="a",
                          aws_secret_access_key="b")  # fmt: skip
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="d.jsonl", Body=jsonl(DEMO_ROWS[:5]).encode())
        for env in ({"DATASET_URI": "s3://locked/d.jsonl", "OUTPUT_URI": str(tmp_path / "out")},
                    {"DATASET_URI": str(DEMO_DATA), "OUTPUT_URI": "s3://locked/runs"}):  # fmt: skip
            result = run_job({"DRY_RUN": "true", "AWS_ENDPOINT_URL_S3": endpoint} | env)
            assert result.returncode == 77, result.stderr[-3000:]
            assert "access denied" in error_line(result)
    finally:
        server.kill()


def test_out_of_memory_maps_to_70_with_the_settings_to_lower():
    import torch

    from entrypoint import as_job_error
    from job.settings import Settings

    settings = Settings(DATASET_URI="d", OUTPUT_URI="o")
    for exc in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")):  # fmt: skip
        error = as_job_error(exc, settings)
        assert error.exit_code == 70
        for name in ("PER_DEVICE_BATCH_SIZE", "GRAD_ACCUM_STEPS", "MAX_SEQ_LENGTH"):
            assert name in str(error)


def test_object_keys_cannot_make_the_job_write_outside_scratch(run_job, s3, bucket, tmp_path):
    put(s3, bucket, "data/ok.jsonl", jsonl(DEMO_ROWS[:5]))
    put(s3, bucket, "data/../../../../../../tmp/escaped.jsonl", jsonl(DEMO_ROWS[:5]))
    result = run_job({"DRY_RUN": "true", "DATASET_URI": f"s3://{bucket}/data/", "OUTPUT_URI": f"s3://{bucket}/runs"})
    assert result.returncode == 65 and "outside the scratch directory" in error_line(result)
    assert not Path("/tmp/escaped.jsonl").exists()
    assert not list((tmp_path / "scratch").rglob("*.jsonl"))


def test_secrets_never_appear_in_logs_or_outputs(run_job, s3, bucket):
    canaries = {"HF_TOKEN": "hf_CANARYtoken1234567890", "AWS_SECRET_ACCESS_KEY": "CANARYsecretKEY0987654321",
                "AWS_ACCESS_KEY_ID": "AKIACANARYACCESSKEY1"}  # fmt: skip
    dataset = put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:12]))
    runs = [
        run_job({"DRY_RUN": "true", "DATASET_URI": dataset, "OUTPUT_URI": f"s3://{bucket}/runs", **canaries}),
        run_job({"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "bad.jsonl", "{oops\n"),
                 "OUTPUT_URI": f"s3://{bucket}/runs", **canaries}),
        run_job({"DATASET_URI": dataset, "OUTPUT_URI": f"s3://{bucket}/runs", "MAX_STEPS": "x", **canaries}),
    ]  # fmt: skip
    assert [r.returncode for r in runs] == [0, 65, 78]
    objects = read_objects(s3, bucket, "runs/")
    assert any(k.endswith("manifest.json") for k in objects) and any(k.endswith("failure.json") for k in objects)
    for value in canaries.values():
        for result in runs:
            assert value not in result.stdout + result.stderr
        for key, body in objects.items():
            assert value.encode() not in body, key


def test_failure_goes_to_the_termination_log(run_job, bucket, tmp_path):
    """Into the file Kubernetes mounts (terminationMessagePath), here one of the test's own: a shared
    /dev/termination-log took the failures of the jobs of tests running beside it."""
    path = tmp_path / "termination-log"
    path.write_text("")
    env = {"DRY_RUN": "true", "DATASET_URI": f"s3://{bucket}/none.jsonl", "OUTPUT_URI": "/tmp/o",
           "TERMINATION_MESSAGE_PATH": str(path)}  # fmt: skip
    assert run_job(env).returncode == 66
    assert path.read_text().startswith(f"exit 66 InputNotFound: s3://{bucket}/none.jsonl")
    assert run_job(env | {"LORA_R": "0"}).returncode == 78  # a configuration error, with no settings read
    assert path.read_text().startswith("exit 78 ConfigInvalid: ") and "LORA_R" in path.read_text()


def test_torchrun_with_two_cpu_processes_publishes_once(run_job, s3, bucket):
    """Every rank trains (DDP over gloo); rank 0 alone reads the dataset and publishes."""
    import sys

    env = {"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:40])),
           "OUTPUT_URI": f"s3://{bucket}/runs"}  # fmt: skip
    result = run_job(env, command=[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"])
    run_id, files = run_outputs(s3, bucket, result)
    manifest = json.loads(files["manifest.json"])
    assert manifest["world_size"] == 2 and manifest["dry_run"] is True
    lines = log_lines(result)
    assert [line["stage"] for line in lines if line["message"] == "publish: started"] == ["publish, rank 0"]
    assert {line["message"] for line in lines if "rank 1" in line["stage"]} <= {"rank 1 of 2 (local rank 1)"}
    rows = [json.loads(line) for line in files["train_log.jsonl"].decode().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]


def test_text_mode_shows_step_lines_a_closing_summary_and_text_errors(run_job, s3, bucket):
    """LOG_FORMAT=text (what a terminal gets): step lines beside the bar, the train loss on the bar, a closing
    summary naming the report and the adapter; and a configuration error as a text line, not JSON."""
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(40)]
    dataset = put(s3, bucket, "d.jsonl", jsonl(rows))
    result = run_job({"DRY_RUN": "true", "DRY_RUN_STEPS": "4", "DATASET_URI": dataset, "EVAL_FRACTION": "0.1",
                      "OUTPUT_URI": f"s3://{bucket}/runs", "LOG_FORMAT": "text", "RUN_ID": "text"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert not any(line.startswith('{"') for line in err.splitlines())
    assert re.search(r"\[train\] step 4/4 loss \d+\.\d+, lr [0-9.e-]+, [0-9.]+ tokens/s, eta", err), err[-2000:]
    assert re.search(r"\[train\] step 4/4 eval loss \d+\.\d+", err)
    assert re.search(r"loss=\d+\.\d+", err), "the bar shows the loss"
    done = re.search(r"done in \d+ s: loss (\S+) -> (\S+), eval loss (\S+), 4 steps, \d+ rows and \d+ tokens", err)
    assert done and float(done[1]) > 0 and float(done[3]) > 0, err[-2000:]
    assert f"report s3://{bucket}/runs/text/report.md, adapter s3://{bucket}/runs/text/adapter" in err

    bad = run_job({"DATASET_URI": dataset, "OUTPUT_URI": f"s3://{bucket}/runs", "LOG_FORMAT": "text",
                   "LORA_R": "zero"})  # fmt: skip
    assert bad.returncode == 78
    [line] = [line for line in bad.stderr.splitlines() if "LORA_R" in line]
    assert " ERROR [start] " in line and not line.startswith("{")


def test_an_unreachable_mlflow_server_exits_75_before_the_first_step_naming_it(run_job, s3, bucket):
    port = free_port()  # nothing listens there
    result = run_job({"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:20])),
                      "OUTPUT_URI": f"s3://{bucket}/runs", "RUN_ID": "tracked", "REPORT_TO": "mlflow",
                      "MLFLOW_TRACKING_URI": f"http://user:canary-pass@127.0.0.1:{port}",
                      "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})  # fmt: skip
    assert result.returncode == 75, result.stderr[-3000:]
    message = error_line(result)
    assert message.startswith("REPORT_TO=mlflow: MLFLOW_TRACKING_URI=http://***@127.0.0.1:") and "REPORT_TO" in message
    assert "canary" not in result.stderr and not any(line["message"].startswith("step ") for line in log_lines(result))


class Refusing(BaseHTTPRequestHandler):
    """A tracking server that refuses every request's credentials (401), as W&B and MLflow do a wrong key."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "unauthorized"}], "error_code": "UNAUTHENTICATED"}')

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_refused_tracking_key_exits_77_before_the_first_step_naming_the_key(run_job, s3, bucket, tracker):
    canary = "canary" * 6 + "abcd"
    with Loopback(Refusing) as server:
        result = run_job({"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:20])),
                          "OUTPUT_URI": f"s3://{bucket}/runs", "RUN_ID": "tracked", "REPORT_TO": tracker,
                          "WANDB_BASE_URL": server.endpoint, "WANDB_API_KEY": canary, "WANDB_DIR": "/tmp",
                          "MLFLOW_TRACKING_URI": server.endpoint, "MLFLOW_TRACKING_TOKEN": canary,
                          "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})  # fmt: skip
    assert result.returncode == 77, result.stderr[-3000:]
    message = error_line(result)
    assert message.startswith(f"REPORT_TO={tracker}: ") and server.endpoint in message, message
    assert ("WANDB_API_KEY" if tracker == "wandb" else "MLFLOW_TRACKING_TOKEN") in message
    assert canary not in result.stderr and not any(line["message"].startswith("step ") for line in log_lines(result))


def test_wandb_online_without_a_key_exits_78_and_without_an_answer_75(run_job, s3, bucket, tmp_path):
    env = {"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(DEMO_ROWS[:20])),
           "OUTPUT_URI": f"s3://{bucket}/runs", "RUN_ID": "tracked", "REPORT_TO": "wandb", "WANDB_DIR": str(tmp_path),
           "NETRC": str(tmp_path / "netrc"), "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}  # fmt: skip
    keyless = run_job(env)
    assert keyless.returncode == 78, keyless.stderr[-3000:]
    assert "WANDB_API_KEY" in error_line(keyless) and "WANDB_MODE=offline" in error_line(keyless)
    away = run_job(env | {"WANDB_API_KEY": "k" * 40, "WANDB_HTTP_TIMEOUT": "2"})  # nothing listens there
    assert away.returncode == 75, away.stderr[-3000:]
    assert error_line(away).startswith(f"REPORT_TO=wandb: WANDB_BASE_URL={env['WANDB_BASE_URL']} did not answer")


def test_names_in_the_environment_that_the_job_would_ignore_exit_78(run_job, tmp_path):
    """EPOCHS (NUM_EPOCHS without its first word) and lora_r (LORA_R in lower case) would train nothing different,
    and a rerun of a complete run would answer "already complete": both are named before anything starts."""
    result = run_job({"DRY_RUN": "true", "DATASET_URI": str(DEMO_DATA), "OUTPUT_URI": str(tmp_path / "out"),
                      "EPOCHS": "2", "lora_r": "8"})  # fmt: skip
    assert result.returncode == 78, result.stderr[-3000:]
    message = error_line(result)
    assert "EPOCHS is set but is not a setting: did you mean NUM_EPOCHS?" in message
    assert "lora_r is set but is not a setting: did you mean LORA_R?" in message
    assert not (tmp_path / "out").exists()


def test_a_lora_rank_above_the_models_narrowest_layer_exits_78_before_loading_it(run_job, tmp_path, tiny_model_dir):
    """The tiny Llama's k_proj and v_proj have 32 out features (2 heads of 16): rank 32 trains, 33 is a 78 from
    config.json, before any training step."""
    env = {"DRY_RUN": "true", "DRY_RUN_STEPS": "1", "BASE_MODEL": str(tiny_model_dir), "DATASET_URI": str(DEMO_DATA),
           "OUTPUT_URI": str(tmp_path / "out"), "NUM_SAMPLE_PROMPTS": "1", "MAX_NEW_TOKENS": "2"}  # fmt: skip
    result = run_job(env | {"LORA_R": "33"})
    assert result.returncode == 78, result.stderr[-3000:]
    assert error_line(result).startswith("LORA_R=33 is above 32, the narrowest width (in or out features) of "
                                         "BASE_MODEL's LORA_TARGET_MODULES layers")  # fmt: skip
    assert not any(line["stage"] in ("model", "train") for line in log_lines(result))
    assert run_job(env | {"LORA_R": "32"}).returncode == 0


@pytest.mark.parametrize("responses_only", ["true", "false"])
def test_the_report_says_which_tokens_counted_in_the_loss_and_how_many(run_job, s3, bucket, responses_only):
    # Long prompts and one-token answers: few of the tokens are in the loss.
    rows = [{"instruction": f"Repeat the number {i} in words, slowly and carefully, please.", "output": f"{i}"}
            for i in range(30)]  # fmt: skip
    result = run_job({"DRY_RUN": "true", "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(rows)),
                      "OUTPUT_URI": f"s3://{bucket}/runs", "TRAIN_ON_RESPONSES_ONLY": responses_only,
                      "NUM_SAMPLE_PROMPTS": "1", "MAX_NEW_TOKENS": "2"})  # fmt: skip
    _, files = run_outputs(s3, bucket, result)
    dataset = json.loads(files["manifest.json"])["dataset"]
    tokens = json.loads(files["metrics.json"])["tokens"]
    report = files["report.md"].decode()
    header, _, row = report.split("## Training")[1].strip().splitlines()[:3]
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | ")))
    assert int(cells["tokens"]) == tokens
    if responses_only == "true":
        assert 0 < dataset["train_loss_tokens"] < dataset["train_tokens"] / 3
        assert int(cells["in the loss"]) == round(tokens * dataset["train_loss_tokens"] / dataset["train_tokens"])
        share = round(100 * dataset["train_loss_tokens"] / dataset["train_tokens"])
        assert f"in the loss: about {share}% of them, the responses' only" in report
    else:
        assert dataset["train_loss_tokens"] == dataset["train_tokens"] and int(cells["in the loss"]) == tokens
        assert "in the loss: all of them (TRAIN_ON_RESPONSES_ONLY=false)" in report
    assert "prompts too" in report
