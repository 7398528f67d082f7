"""`make demo`: the whole job, end to end, on this machine.

Starts a local S3 server (moto), uploads the bundled sample dataset (demo/instructions.jsonl, 309
instruction rows), runs `entrypoint.py` with DRY_RUN=true against it, copies the run's folder to
.demo/runs/RUN_ID/ and prints the report's location and the samples.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}


def main() -> int:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="demo",
                          aws_secret_access_key="demo")  # fmt: skip
        s3.create_bucket(Bucket="demo")
        s3.upload_file(str(ROOT / "demo" / "instructions.jsonl"), "demo", "datasets/instructions.jsonl")
        print(f"local S3 server at {endpoint}; dataset at s3://demo/datasets/instructions.jsonl\n", flush=True)
        env = os.environ | CREDENTIALS | {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "DATASET_URI": "s3://demo/datasets/instructions.jsonl",
            "OUTPUT_URI": "s3://demo/runs",
            "DRY_RUN": "true",
            "EVAL_FRACTION": "0.05",
            "MAX_NEW_TOKENS": "24",
            "LOG_FORMAT": "text",
            "HF_HUB_OFFLINE": "1",  # the demo needs no Hub: a tiny Llama and a tokenizer learned from the data
            "SCRATCH_DIR": str(ROOT / ".demo" / "scratch"),
        }  # fmt: skip
        # Run from .demo/ so that a .env in the checkout does not change the demo.
        (ROOT / ".demo").mkdir(exist_ok=True)
        job = subprocess.run([sys.executable, str(ROOT / "entrypoint.py")], env=env, cwd=ROOT / ".demo")
        if job.returncode:
            print(f"\nthe job exited {job.returncode}", file=sys.stderr)
            return job.returncode
        return show(s3)
    finally:
        server.stop()


def show(s3) -> int:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="demo", Prefix="runs/")["Contents"]]
    run_id = keys[0].split("/")[1]
    local = ROOT / ".demo" / "runs" / run_id
    for key in keys:
        target = local / key.split("/", 2)[2]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("demo", key, str(target))
    manifest = json.loads((local / "manifest.json").read_text())
    print(f"\nrun {run_id}: {len(manifest['files'])} files published to s3://demo/runs/{run_id}/, copied to {local}")
    print(f"report: {local / 'report.md'}\n")
    print((local / "report.md").read_text().split("## Samples")[0])
    rows = [json.loads(line) for line in (local / "samples.jsonl").read_text().splitlines()]
    print(f"{'prompt':<44} {'fine-tuned':<24} {'base':<24} {'reference':<20}")
    for row in rows:
        print(f"{cut(row['prompt'], 44):<44} {cut(row['response'], 24):<24} {cut(row['base_response'], 24):<24} "
              f"{cut(row['reference'], 20):<20}")  # fmt: skip
    print("\n(a dry run trains a tiny random model for a few steps: the responses show the plumbing, not quality)")
    return 0


def cut(text: str | None, width: int) -> str:
    text = " ".join((text or "-").split())
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
