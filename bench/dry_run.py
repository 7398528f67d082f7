"""`make bench-dry-run`: how long the dry run takes on 1,000 rows, through a local S3 server.

The goal: under two minutes on two CPU cores. Prints the
wall time of the whole process (imports included) and the seconds of each stage from metrics.json.
"""

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parents[1]
ROWS = 1000


def main() -> int:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's access log
    demo = [json.loads(line) for line in (ROOT / "demo" / "instructions.jsonl").read_text().splitlines()]
    rows = [demo[i % len(demo)] | {"input": f"{demo[i % len(demo)]['input']} (#{i})"} for i in range(ROWS)]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                          aws_secret_access_key="bench")  # fmt: skip
        s3.create_bucket(Bucket="bench")
        s3.put_object(Bucket="bench", Key="rows.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
        with tempfile.TemporaryDirectory() as scratch:
            env = os.environ | credentials | {
                "AWS_ENDPOINT_URL_S3": endpoint, "DATASET_URI": "s3://bench/rows.jsonl", "OUTPUT_URI": "s3://bench/runs",
                "DRY_RUN": "true", "EVAL_FRACTION": "0.1", "LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1",
                "SCRATCH_DIR": scratch,
            }  # fmt: skip
            start = time.perf_counter()
            job = subprocess.run([sys.executable, str(ROOT / "entrypoint.py")], env=env, cwd=scratch,
                                 capture_output=True, text=True)  # fmt: skip
            seconds = time.perf_counter() - start
        if job.returncode:
            print(job.stderr[-3000:], file=sys.stderr)
            return job.returncode
        [key] = [o["Key"] for o in s3.list_objects_v2(Bucket="bench")["Contents"] if o["Key"].endswith("metrics.json")]
        stages = json.loads(s3.get_object(Bucket="bench", Key=key)["Body"].read())["seconds_per_stage"]
    finally:
        server.stop()
    print(f"dry run, {ROWS} rows, {os.cpu_count()} CPU cores: {seconds:.1f} s wall (target: under 120 s)")
    print("  " + ", ".join(f"{name} {value:.1f} s" for name, value in stages.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
