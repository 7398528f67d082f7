"""`make bench`: the GPU benchmark tables. Each backend of each shape runs in its own process
(bench/train_bench.py; unsloth patches transformers for the whole process), then unsloth again under
torchrun on every GPU of the machine when it has more than one. Then the real-data section: the whole job
through entrypoint.py on an Alpaca-like length mix, both backends (bench/real_data.py). Prints markdown
tables with the unsloth/hf ratios, the multi-GPU scaling and the memory estimate, ready for docs/benchmarks.md.

    python bench/run.py [--shapes llama-3.2-1b,llama-3-8b] [--steps 15] [--real-data llama-3-8b] [--out DIR]
"""

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(command: list[str], log: Path) -> dict | None:
    with log.open("w") as f:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        print(f"failed ({done.returncode}): {' '.join(command)}; see {log}", file=sys.stderr)
        return None
    return json.loads(lines[-1].removeprefix("BENCH "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for the torchrun row (default: all)")
    parser.add_argument("--real-data", default="llama-3-8b", help="shape of the real-data section; none: skip it")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    import torch

    gpus = args.gpus or torch.cuda.device_count()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    for shape in args.shapes.split(","):
        bench = [str(HERE / "train_bench.py"), "--shape", shape, "--steps", str(args.steps), "--backend"]
        for backend in ("unsloth", "hf"):
            results.append(run([sys.executable, *bench, backend], args.out / f"{shape}-{backend}.log"))
        if gpus > 1:
            results.append(run([*torchrun, *bench, "unsloth"], args.out / f"{shape}-unsloth-{gpus}gpu.log"))
    results = [r for r in results if r]
    (args.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    print(table(results))
    complete = len(results) == len(args.shapes.split(",")) * (2 + (gpus > 1))
    if args.real_data != "none":
        (args.out / "real-data.jsonl").unlink(missing_ok=True)
        for backend in ("unsloth", "hf"):
            command = [sys.executable, str(HERE / "real_data.py"), "--shape", args.real_data, "--backend", backend]
            complete &= subprocess.run([*command, "--out", str(args.out)], stdout=subprocess.DEVNULL).returncode == 0
        import real_data

        lines = (args.out / "real-data.jsonl").read_text().splitlines()
        print("\n" + real_data.table([json.loads(line) for line in lines]))
    return 0 if complete else 1


def table(results: list[dict]) -> str:
    first = results[0]
    lines = [
        f"{date.today()}, {first['gpu']}, torch {first['torch']}, seq {first['seq']}, batch {first['batch']} per GPU, "
        f"QLoRA r=16 on all 7 projections, adamw_8bit, median of {first['steps_timed']} steps after warm-up, "
        f"bf16 matmul peak {first['matmul_peak_tflops']} TFLOP/s",
        "",
        "| shape | backend | GPUs | micro-batch, checkpointing | s/step | tokens/s | peak GiB | estimated GiB | "
        "to first step s | MFU | vs hf | scaling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["shape"], r["backend"], r["gpus"]): r for r in results}
    for r in results:
        hf = by_key.get((r["shape"], "hf", 1))
        single = by_key.get((r["shape"], r["backend"], 1))
        versus = (
            f"{r['tokens_per_second'] / hf['tokens_per_second']:.2f}x tok/s, "
            f"{r['peak_gpu_gib'] / hf['peak_gpu_gib']:.0%} mem"
            if hf and r["backend"] == "unsloth" and r["gpus"] == 1
            else ""
        )
        scaling = f"{r['tokens_per_second'] / (single['tokens_per_second'] * r['gpus']):.0%}" if r["gpus"] > 1 else ""
        checkpointing = "on" if r["checkpointing"] else "off"
        lines.append(
            f"| {r['shape']} | {r['backend']} | {r['gpus']} | {r['micro_batch']}, {checkpointing} | "
            f"{r['seconds_per_step']} | {r['tokens_per_second']:,} | {r['peak_gpu_gib']} | {r['estimated_gib']} | "
            f"{r['seconds_to_first_step']} | {r['mfu']:.1%} | {versus} | {scaling} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
