"""Fixtures: a real S3 server (moto, over HTTP on loopback), tiny real models saved with save_pretrained,
and a runner for the real entry point as a subprocess."""

import http.client
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def job_environment(tmp_path: Path, s3_endpoint: str, env: dict) -> dict:
    """A clean environment for the entry point plus env (a None value removes a variable)."""
    base = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",  # the Hub is unreachable here: fail fast instead of retrying
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_MAX_ATTEMPTS": "2",
        "SCRATCH_DIR": str(tmp_path / "scratch"),
        "LOG_FORMAT": "json",
        "OMP_NUM_THREADS": "1",  # tiny models gain nothing from threads, and tests run jobs side by side
        **CREDENTIALS,
    }
    return {k: v for k, v in (base | env).items() if v is not None}


@pytest.fixture
def run_job(tmp_path, s3_endpoint):
    """Runs `python entrypoint.py` with a clean environment plus env; returns the CompletedProcess."""

    def run(env: dict, cwd: Path | None = None, command: list[str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*(command or [sys.executable]), str(ROOT / "entrypoint.py")],
            env=job_environment(tmp_path, s3_endpoint, env),
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run


@pytest.fixture
def start_job(tmp_path, s3_endpoint):
    """Starts `python entrypoint.py` like run_job, its JSON log lines readable from stderr as they come."""

    def start(env: dict, command: list[str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [*(command or [sys.executable]), str(ROOT / "entrypoint.py")],
            env=job_environment(tmp_path, s3_endpoint, env),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    return start


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


class Loopback:
    """An HTTP server on 127.0.0.1, serving in a thread while entered; its handler reaches this object as
    self.server.owner."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.owner = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


class FaultyProxy(Loopback):
    """An S3 endpoint on loopback that forwards every request to upstream (moto) and fails a fraction of them:
    fault_rate (0 to 1) of the requests fail, each in one of the ways in faults, drawn from a random.Random with
    a fixed seed. The n-th request's fate is the same in every run; with concurrent transfers, which request
    comes n-th may differ.

    - "503": 503 SlowDown, "500": 500 InternalError, each with S3's XML error body; "reset": the connection is
      reset (TCP RST) without an answer, the body unread. All three happen BEFORE the request reaches the
      store, as S3 does nothing for a request it throttles, so a retry never meets its own earlier write.
    - "lost": the request is forwarded and the store acts on it, then the connection is reset: a write that
      landed whose answer never came (a retried conditional write then fails its own condition).
    - "blackhole": the request is read, then neither forwarded nor answered; its connection is held open until
      the proxy shuts down, as behind a network partition.

    fail_first = N (instead of fault_rate) fails the first N attempts of every request, each in a way drawn from
    faults: botocore numbers a request's tries in its amz-sdk-request header ("attempt=K; max=M"); a request
    without one passes. Also: only (a substring of the path) limits the faults to the requests whose path has it;
    max_faults caps the faults (None: no cap); faulted counts them by kind; requests lists
    every request as "METHOD /path?query"; refuse_conditional answers conditional writes (If-Match,
    If-None-Match) with 501 NotImplemented, as stores without them do. Request bodies are read whole (by
    Content-Length, or HTTP chunked; aws-chunked content passes as it is) and forwarded with a Content-Length."""

    ERRORS = {
        "503": (503, "SlowDown", "Please reduce your request rate."),
        "500": (500, "InternalError", "We encountered an internal error. Please try again."),
        "501": (501, "NotImplemented", "A header you provided implies functionality that is not implemented."),
    }

    def __init__(self, upstream: str, seed: int = 0):
        self.upstream = upstream.removeprefix("http://")
        self.fault_rate, self.faults, self.max_faults, self.faulted = 0.0, ("503", "500", "reset"), None, Counter()
        self.fail_first, self.only, self.refuse_conditional, self.requests = 0, "", False, []
        self._random, self._lock, self.released = random.Random(seed), threading.Lock(), threading.Event()
        super().__init__(_ProxyHandler)

    def __exit__(self, *exc):
        self.released.set()  # black-holed requests end with the proxy
        super().__exit__(*exc)

    def fault(self, path: str, headers) -> str | None:
        """How this request fails, or None to forward it."""
        if self.refuse_conditional and ("If-Match" in headers or "If-None-Match" in headers):
            return "501"
        if self.only not in path:
            return None
        attempt = re.search(r"attempt=(\d+)", headers.get("amz-sdk-request", ""))
        with self._lock:
            if self.max_faults is not None and self.faulted.total() >= self.max_faults:
                return None
            if self.fail_first:
                if not attempt or int(attempt[1]) > self.fail_first:
                    return None
            elif self._random.random() >= self.fault_rate:
                return None
            kind = self._random.choice(self.faults)
            self.faulted[kind] += 1
            return kind


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Expect: 100-continue, as boto3 uses them
    HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "te", "trailer"}

    def log_message(self, *args):
        pass

    def forward(self):
        proxy: FaultyProxy = self.server.owner
        proxy.requests.append(f"{self.command} {self.path}")
        fault = proxy.fault(self.path, self.headers)
        if fault == "reset":
            return self.reset()
        body = self.read_body()
        if fault == "blackhole":
            proxy.released.wait()
            return self.reset()
        if fault in FaultyProxy.ERRORS:
            status, code, message = FaultyProxy.ERRORS[fault]
            xml = f"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>{code}</Code><Message>{message}</Message>"
            return self.answer(status, [("Content-Type", "application/xml")], f"{xml}</Error>".encode())
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            content = response.read()
        finally:
            upstream.close()
        if fault == "lost":
            return self.reset()
        self.answer(response.status, response.getheaders(), content)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    def read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers, up to the blank line
            pass
        return b"".join(chunks)

    def answer(self, status: int, headers: list[tuple[str, str]], content: bytes) -> None:
        self.send_response_only(status)
        kept = [(k, v) for k, v in headers if k.lower() not in {"connection", "keep-alive", "transfer-encoding"}]
        for key, value in kept:
            self.send_header(key, value)
        if not any(k.lower() == "content-length" for k, _ in kept):  # a HEAD's stays the object's length
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def reset(self) -> None:
        """Drops the connection with a TCP reset: SO_LINGER 0, then the socket closed (not shut down) here."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the reader holds the socket open; closing it lets close() below close the socket
        self.connection.close()


@pytest.fixture
def faulty_s3(s3_endpoint):
    """A FaultyProxy in front of the session's moto server; it passes everything until the test sets
    fault_rate. Point a Storage at faulty_s3.endpoint."""
    with FaultyProxy(s3_endpoint) as proxy:
        yield proxy
