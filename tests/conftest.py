"""Fixtures: a real S3 server (moto, over HTTP on loopback), tiny real models saved with save_pretrained,
and a runner for the real entry point as a subprocess."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "demo" / "instructions.jsonl"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(**env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        env=os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto_server did not start")


@pytest.fixture(scope="session")
def s3_endpoint():
    server, endpoint = start_moto()
    yield endpoint
    server.kill()


@pytest.fixture(scope="session")
def s3(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials())


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket named after the test."""
    name = f"t{uuid.uuid4().hex[:8]}-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    s3.create_bucket(Bucket=name)
    return name


def put(s3, bucket: str, key: str, body) -> str:
    s3.put_object(Bucket=bucket, Key=key, Body=body if isinstance(body, bytes) else body.encode())
    return f"s3://{bucket}/{key}"


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def read_objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.fixture
def run_job(tmp_path, s3_endpoint):
    """Runs `python entrypoint.py` with a clean environment plus env; returns the CompletedProcess."""

    def run(env: dict, cwd: Path | None = None, command: list[str] | None = None) -> subprocess.CompletedProcess:
        base = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",  # the Hub is unreachable here: fail fast instead of retrying
            "AWS_ENDPOINT_URL_S3": s3_endpoint,
            "AWS_MAX_ATTEMPTS": "2",
            "SCRATCH_DIR": str(tmp_path / "scratch"),
            "LOG_FORMAT": "json",
            **CREDENTIALS,
        }
        return subprocess.run(
            [*(command or [sys.executable]), str(ROOT / "entrypoint.py")],
            env={k: v for k, v in (base | env).items() if v is not None},
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run


def log_lines(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]


def error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line["message"] for line in log_lines(result) if line["level"] == "error"]
    assert errors, f"no error logged; stderr:\n{result.stderr[-3000:]}"
    return errors[-1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real 2-layer Llama (hidden 64) with a BPE tokenizer trained on the demo data, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from job.model import train_tokenizer

    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    tokenizer = train_tokenizer([{"prompt": r["instruction"] + r["input"], "completion": r["output"]} for r in rows])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        # Wide enough weights that LoRA alone can sharpen the output: at the default 0.02 a 64-wide model's
        # frozen head caps every logit near 1, and the loss cannot fall far below log(vocab).
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
