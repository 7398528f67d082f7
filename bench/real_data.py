"""`make bench`'s real-data section: the whole job (entrypoint.py) on an Alpaca-like length mix generated here,
with the notebook's settings, packing with the batch as given, and the job's defaults (packing and the automatic
batch), beside the defaults on full 2,048-token rows; prints a markdown table for docs/benchmarks.md.

    python bench/real_data.py --shape llama-3-8b --backend unsloth [--steps 20] [--out bench-results]

Useful tokens are the tokens trained (every non-padding token). The estimate is the job's own pre-flight peak.
MFU: steady useful tokens/s x 4N FLOPs (N the model's parameters) against a bf16 matmul peak measured first, in a
process of its own (bench/train_bench.py's).
"""

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.synthetic_model import DEMO_DATA, build  # noqa: E402
from bench.train_bench import mfu, steady_spans  # noqa: E402
from job.model import parameter_count  # noqa: E402

RUNS = {  # key: (what the table calls it, dataset, settings beside the job's defaults)
    "full": ("full rows, defaults", "full", {}),
    "notebook": (
        "short rows, notebook (batch 2 x 4, no packing)",
        "short",
        {"PACKING": "false", "AUTO_BATCH": "false"},
    ),
    "packed": ("short rows, packing, batch as given", "short", {"AUTO_BATCH": "false"}),
    "defaults": ("short rows, defaults", "short", {}),
}


def alpaca_like(count: int, seed: int = 0) -> list[dict]:
    """Rows with Alpaca's long-tailed lengths: lognormal word counts, about 100 words in the median row, a few
    hundred in the longest."""
    words, rng = DEMO_DATA.read_text().split(), random.Random(seed)

    def text(median: float, sigma: float) -> str:
        return " ".join(rng.choices(words, k=max(1, round(rng.lognormvariate(math.log(median), sigma)))))

    return [
        {"instruction": text(14, 0.5), "input": text(12, 1.0) if rng.random() < 0.4 else "", "output": text(75, 0.9)}
        for _ in range(count)
    ]


def full_rows(count: int, seed: int = 1) -> list[dict]:
    """Rows longer than 2,048 tokens: every sequence is full, cut at MAX_SEQ_LENGTH."""
    words, rng = DEMO_DATA.read_text().split(), random.Random(seed)
    return [
        {"instruction": " ".join(rng.choices(words, k=20)), "input": "", "output": " ".join(rng.choices(words, k=3000))}
        for _ in range(count)
    ]


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_steps(run: Path) -> list[dict]:
    """The training rows (those with a loss) of the published run's train_log.jsonl."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def steady_rate(steps: list[dict]) -> int | None:
    """The median tokens/s of the steps after the warm-up, as bench/train_bench.py counts them."""
    rates = [tokens_per_second for _, tokens_per_second in steady_spans(steps)]
    return round(statistics.median(rates)) if rates else None


def run_job(name: str, env: dict, out: Path, timeout: float | None = None) -> dict:
    """Runs the entry point; past `timeout` seconds it is aborted, and its log ends with every thread's stack
    (faulthandler), which says where a run that never reaches its first step waits."""
    log = out / f"{name}.log"
    start = time.time()
    with log.open("w") as f:
        job = subprocess.Popen([sys.executable, "-X", "faulthandler", str(ROOT / "entrypoint.py")],
                               env=os.environ | env, stderr=f)  # fmt: skip
        try:
            code = job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            job.send_signal(signal.SIGABRT)
            code = job.wait()
            print(f"{name}: aborted after {timeout:.0f} s; its stacks end {log}", file=sys.stderr)
    wall = time.time() - start
    metrics_file = Path(env["OUTPUT_URI"]) / env["RUN_ID"] / "metrics.json"
    if code or not metrics_file.is_file():
        print(f"{name}: exit {code}; see {log}", file=sys.stderr)
        return {"name": name, "exit": code}
    metrics = json.loads(metrics_file.read_text())
    steps = train_steps(metrics_file.parent)
    # Where the first minute goes: seconds from the process's start to the first line of each stage.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"time"')]
    stages = {}
    for line in lines:
        stages.setdefault(line["stage"], round(line["time"] - start, 1))
    return {"name": name, "exit": code, "wall_seconds": round(wall, 1), **metrics,
            "steady_tokens_per_second": steady_rate(steps), "stage_starts": stages,
            "steps_logged": [(r["step"], r["tokens"], r["seconds"], round(r["loss"], 4)) for r in steps]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--backend", choices=["unsloth", "hf"], required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", default=",".join(RUNS), help="keys of RUNS, comma-separated")
    parser.add_argument("--models", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--timeout", type=float, help="seconds before a run is aborted, with its stacks in its log")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "real-data"
    work.mkdir(exist_ok=True)
    model = args.models / f"{args.shape}-4bit"  # pre-quantized, as the default BASE_MODEL is
    if not model.is_dir():
        build(args.shape, model, quantized=True)
    data = {"short": write(alpaca_like(6000), work / "short.jsonl"), "full": write(full_rows(400), work / "full.jsonl")}
    measure = "from bench.train_bench import matmul_peak_tflops; print(matmul_peak_tflops())"
    peak = float(subprocess.run([sys.executable, "-c", measure], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout)  # fmt: skip
    from transformers import AutoConfig

    parameters = parameter_count(AutoConfig.from_pretrained(model))
    results = []
    for key in args.runs.split(","):
        name, dataset, settings = RUNS[key]
        tag = f"{args.shape}-{args.backend}-{key}"
        env = {"BASE_MODEL": str(model), "DATASET_URI": str(data[dataset]), "OUTPUT_URI": str(work / "runs"),
               "RUN_ID": tag, "TRAIN_BACKEND": args.backend, "MAX_STEPS": str(args.steps), "LOG_FORMAT": "json",
               "NUM_SAMPLE_PROMPTS": "2", "MAX_NEW_TOKENS": "32", "SCRATCH_DIR": str(work / "scratch"),
               "CHECKPOINT_EVERY_STEPS": "0", **settings}  # fmt: skip
        result = run_job(tag, env, work, args.timeout) | {"shape": args.shape, "backend": args.backend, "run": name,
                                            "parameters": parameters, "matmul_peak_tflops": round(peak)}  # fmt: skip
        results.append(result)
        print("REAL " + json.dumps(result), flush=True)
    with (args.out / "real-data.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    print(table(results))
    return 0 if all(r["exit"] == 0 for r in results) else 1


def table(results: list[dict]) -> str:
    lines = [
        "| shape | backend | run | micro-batch x accumulation, checkpointing | useful tokens/s steady | whole | "
        "vs full rows (steady) | MFU | rows trained | wall s | first step s | peak GiB | estimated GiB | "
        "estimate error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full = {(r["shape"], r["backend"]): r for r in results if r["run"] == RUNS["full"][0] and r["exit"] == 0}
    for r in results:
        if r["exit"]:
            lines.append(f"| {r['shape']} | {r['backend']} | {r['run']} | exit {r['exit']} | | | | | | | | | | |")
            continue
        base = full.get((r["shape"], r["backend"]))
        steady = r["steady_tokens_per_second"]
        versus = f"{steady / base['steady_tokens_per_second']:.0%}" if base and steady else ""
        peak, estimate = r["peak_gpu_memory_gib"], r["estimated_peak_gpu_memory_gib"]
        error = f"{estimate / peak - 1:+.0%}" if peak and estimate else ""
        measured = steady and "parameters" in r  # rows of earlier results have no MFU
        utilisation = f"{mfu(steady, r['parameters'], r['matmul_peak_tflops']):.0%}" if measured else ""
        lines.append(
            f"| {r['shape']} | {r['backend']} | {r['run']} | {r['micro_batch']} x {r['grad_accum']}, "
            f"{'on' if r['activation_checkpointing'] else 'off'} | {steady or 0:,} | {r['tokens_per_second']:,.0f} | "
            f"{versus} | {utilisation} | {r['rows']} | {r['wall_seconds']} | {r['seconds_to_first_step']} | {peak} | "
            f"{estimate} | {error} |"
        )
    # What AUTO_BATCH changes is the split, not the learning: the loss curves of "packed" (as given) and "defaults"
    # (automatic), the same effective batch and seed.
    by_run = {(r["shape"], r["backend"], r["run"]): r for r in results if r["exit"] == 0}
    for (shape, backend, run), given in by_run.items():
        auto = by_run.get((shape, backend, RUNS["defaults"][0]))
        if run == RUNS["packed"][0] and auto:
            pairs = list(zip((s[3] for s in given["steps_logged"]), (s[3] for s in auto["steps_logged"])))
            worst = max(abs(a - b) / abs(a) for a, b in pairs)
            lines.append(f"\n{shape} {backend}: loss, batch as given against automatic, {len(pairs)} steps: "
                         f"at most {worst:.2%} apart")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
