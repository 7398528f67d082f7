"""`make bench-data`: the data stage on datasets of millions of rows, on CPU, with bench/real_data.py's Alpaca-like
length mix; prints a markdown table for docs/benchmarks.md.

    python bench/data_scale.py [--rows 3000000] [--dry-run-rows 300000] [--work /tmp/bench-data]

1. A real run's inputs and data stages on --rows rows (entrypoint.read_inputs and prepare_data as the job calls them,
   in a process of their own, with a tiny Llama whose byte-level BPE tokenizer is learned from the demo data): their
   seconds, their peak memory (the anonymous memory of every process, and the RSS of the job's process and of its
   largest tokenizing worker, which counts the Arrow files' pages that it read), and the tokenizing rate per core.
2. The same again on the same scratch folder, as a restarted attempt does: the rows and tokens are reused.
3. The dry run through the real entry point on the first --dry-run-rows rows (the target: a minute on two cores),
   then its restart.

With --model FOLDER (a GPU host), instead: a real run through entrypoint.py on the --rows rows with that model and
the job's defaults, MAX_STEPS=5: its seconds per stage (the data stage labels and packs every row) and its time to
first step.
"""

import argparse
import contextlib
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.real_data import alpaca_like  # noqa: E402


def write_rows(path: Path, count: int) -> Path:
    """count Alpaca-like rows as JSON lines, written 100,000 at a time (each block its own seed)."""
    if path.is_file() and sum(1 for _ in path.open()) == count:
        return path
    with path.open("w") as f:
        for block in range(0, count, 100_000):
            rows = alpaca_like(min(100_000, count - block), seed=block)
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with a BPE tokenizer learned from the demo data (as tests/conftest.py's), saved."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, LlamaConfig

    from job.model import train_tokenizer

    demo = [json.loads(line) for line in (ROOT / "demo" / "instructions.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer([{"prompt": r["instruction"] + r["input"], "completion": r["output"]} for r in demo])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Memory(threading.Thread):
    """The peak, sampled every second, of the anonymous memory of this process and its children added up (each
    one's proportional share: Pss_Anon), the memory that the job itself holds. RSS also counts the pages of the
    memory-mapped Arrow files that a process read, which the page cache holds once for all processes and the kernel
    drops under pressure."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0

    def run(self):
        import psutil  # accelerate's dependency

        me = psutil.Process()
        while True:
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(OSError):  # a worker that ended meanwhile
                    rollup = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
                    total += int(rollup.split("Pss_Anon:")[1].split()[0]) * 1024
            self.peak = max(self.peak, total)
            time.sleep(1)


def stages() -> dict:
    """In a process of its own, configured by the environment: the inputs and data stages, timed, with the
    tokenizing itself (data.tokenize) timed apart."""
    import entrypoint
    from job import data, logs, model
    from job.context import Device, Run
    from job.settings import read_settings
    from job.storage import Storage

    settings = read_settings()
    logs.setup(settings.LOG_FORMAT)
    tokenizing = {"seconds": 0.0, "rows": 0}
    tokenize = data.tokenize

    def timed(tokenizer, rows, *args, **kwargs):
        start = time.perf_counter()
        try:
            return tokenize(tokenizer, rows, *args, **kwargs)
        finally:
            tokenizing["seconds"] += time.perf_counter() - start
            tokenizing["rows"] += len(rows)

    data.tokenize = timed
    memory = Memory()
    memory.start()
    storage, device = Storage(settings), Device.detect(settings)
    run = Run.build(settings, settings.RUN_ID, device, "hf")
    start = time.perf_counter()
    listing = storage.identify(settings.DATASET_URI)  # main() does this before the stages: the files' sha256
    identified = time.perf_counter()
    inputs = entrypoint.read_inputs(settings, storage, run, listing)
    read = time.perf_counter()
    base = model.fetch_base(settings, storage, device, run.scratch / "base_model")
    prepared = entrypoint.prepare_data(settings, run, base, inputs)
    done = time.perf_counter()
    kib = 2**20  # ru_maxrss is in KiB
    scratch = sum(path.stat().st_size for path in (run.scratch / "data").rglob("*") if path.is_file())
    return {
        "rows": len(inputs.rows),
        "train_rows": prepared.train_rows,
        "identify_seconds": round(identified - start, 1),
        "inputs_seconds": round(read - identified, 1),
        "data_seconds": round(done - read, 1),
        "tokenize_seconds": round(tokenizing["seconds"], 1),
        "tokenized_rows": tokenizing["rows"],
        "workers": data.workers(tokenizing["rows"], data.cores()) or 1,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, 2),
        "worker_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib, 2),
        "peak_anonymous_gib": round(memory.peak / 2**30, 2),
        "scratch_gib": round(scratch / 2**30, 2),
    }


def run_stages(env: dict, log: Path) -> dict:
    with log.open("a") as f:
        done = subprocess.run([sys.executable, __file__, "--stages"], env=os.environ | env, stdout=subprocess.PIPE,
                              stderr=f, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def whole_job(env: dict, log: Path) -> tuple[dict, dict]:
    """entrypoint.py with env: its wall and stage seconds, and its metrics.json."""
    start = time.perf_counter()
    with log.open("a") as f:
        code = subprocess.run([sys.executable, str(ROOT / "entrypoint.py")], env=os.environ | env, stderr=f).returncode
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"entrypoint.py exited {code}: see {log}")
    metrics = json.loads(Path(env["OUTPUT_URI"], env["RUN_ID"], "metrics.json").read_text())
    return {"wall_seconds": round(wall, 1), **metrics["seconds_per_stage"]}, metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--dry-run-rows", type=int, default=300_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-data"))
    parser.add_argument("--model", type=Path, help="a real run on a GPU with this model instead (the defaults)")
    parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages:
        print(json.dumps(stages()))
        return 0
    if args.model:
        return real_run(args)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    big = write_rows(work / f"rows-{args.rows}.jsonl", args.rows)
    small = work / f"rows-{args.dry_run_rows}.jsonl"
    with big.open() as source, small.open("w") as target:
        target.writelines(itertools.islice(source, args.dry_run_rows))
    print(f"rows written in {time.perf_counter() - started:.0f} s: {big} {big.stat().st_size / 1e9:.2f} GB, "
          f"{small} {small.stat().st_size / 1e6:.0f} MB", flush=True)  # fmt: skip
    common = {"OUTPUT_URI": str(work / "runs"), "SCRATCH_DIR": str(work / "scratch"), "LOG_FORMAT": "json",
              "HF_HUB_OFFLINE": "1", "CHECKPOINT_EVERY_STEPS": "0"}  # fmt: skip
    real = common | {"DATASET_URI": str(big), "RUN_ID": "bench-data", "BASE_MODEL": str(tiny_model(work / "tiny")),
                     "TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false", "OPTIMIZER": "adamw_torch"}  # fmt: skip
    for folder in (work / "scratch", work / "runs"):  # a fresh start: nothing to reuse
        shutil.rmtree(folder, ignore_errors=True)
    first = run_stages(real, work / "stages.log")
    print("STAGES " + json.dumps(first), flush=True)
    again = run_stages(real, work / "stages.log")
    print("RESTART " + json.dumps(again), flush=True)
    dry = common | {"DATASET_URI": str(small), "RUN_ID": "bench-dry-run", "DRY_RUN": "true", "EVAL_FRACTION": "0.1"}
    dry_first, _ = whole_job(dry, work / "dry-run.log")
    print("DRY " + json.dumps(dry_first), flush=True)
    (work / "runs" / "bench-dry-run" / "manifest.json").unlink()  # so that the next attempt runs it again
    dry_again, _ = whole_job(dry, work / "dry-run.log")
    print("DRY RESTART " + json.dumps(dry_again), flush=True)
    print(table(args, big, small, first, again, dry_first, dry_again))
    return 0


def real_run(args) -> int:
    """The whole job on a GPU on --rows rows, five steps: where the time goes before the first one."""
    args.work.mkdir(parents=True, exist_ok=True)
    rows = write_rows(args.work / f"rows-{args.rows}.jsonl", args.rows)
    env = {"DATASET_URI": str(rows), "BASE_MODEL": str(args.model), "OUTPUT_URI": str(args.work / "runs"),
           "RUN_ID": f"bench-data-gpu-{args.rows}", "SCRATCH_DIR": str(args.work / "scratch-gpu"),
           "MAX_STEPS": "5", "CHECKPOINT_EVERY_STEPS": "0", "NUM_SAMPLE_PROMPTS": "1", "LOG_FORMAT": "json",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    for folder in (args.work / "scratch-gpu", args.work / "runs" / env["RUN_ID"]):
        shutil.rmtree(folder, ignore_errors=True)
    wall, metrics = whole_job(env, args.work / "gpu-run.log")
    print("GPU " + json.dumps(wall | {k: metrics.get(k) for k in ("seconds_to_first_step", "rows", "tokens")}))
    stages = ", ".join(f"{k} {v}" for k, v in wall.items())
    print(f"| real run on a GPU, defaults, 5 steps | {args.rows:,} | {rows.stat().st_size / 1e9:.2f} GB | {stages} "
          f"| first step at {metrics.get('seconds_to_first_step')} s |")  # fmt: skip
    return 0


def table(args, big: Path, small: Path, first: dict, again: dict, dry: dict, dry_again: dict) -> str:
    rate = first["tokenized_rows"] / first["tokenize_seconds"]
    return "\n".join([
        "| run | rows | file | stage seconds | peak GiB: anonymous, all processes / RSS job / RSS largest worker "
        "| tokenizing |",
        "|---|---|---|---|---|---|",
        f"| real run, inputs + data stages | {first['rows']:,} | {big.stat().st_size / 1e9:.2f} GB | "
        f"sha256 {first['identify_seconds']}, inputs {first['inputs_seconds']}, data {first['data_seconds']} | "
        f"{first['peak_anonymous_gib']} / {first['peak_rss_gib']} / {first['worker_peak_rss_gib']} | "
        f"{first['tokenized_rows']:,} rows in "
        f"{first['tokenize_seconds']} s: {rate:,.0f} rows/s, {rate / first['workers']:,.0f} a core ({first['workers']}"
        f" workers); {first['scratch_gib']} GiB on scratch |",
        f"| the same, restarted on its scratch volume | {again['rows']:,} | | sha256 {again['identify_seconds']}, "
        f"inputs {again['inputs_seconds']}, data {again['data_seconds']} | {again['peak_anonymous_gib']} / "
        f"{again['peak_rss_gib']} / {again['worker_peak_rss_gib']} | none: reused |",
        f"| dry run (entrypoint.py, EVAL_FRACTION=0.1) | {args.dry_run_rows:,} | {small.stat().st_size / 1e6:.0f} MB | "
        f"{dry['wall_seconds']} wall: " + ", ".join(f"{k} {v:.1f}" for k, v in dry.items() if k != "wall_seconds")
        + " | | 2,000 training and 20 held-out rows |",
        f"| the dry run's next attempt | {args.dry_run_rows:,} | | {dry_again['wall_seconds']} wall: "
        + ", ".join(f"{k} {v:.1f}" for k, v in dry_again.items() if k != "wall_seconds") + " | | none: reused |",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
