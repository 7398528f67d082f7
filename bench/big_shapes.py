"""Issue 22 on the GPU: a model that fits only in 4-bit (Llama-3.1-70B) and long sequences (16k and 32k tokens),
through the real entry point: the memory estimate against the peak, tokens/s, the first step, checkpoint size,
stall and upload, SIGTERM to commit, and the grace period the job asks for.

    python3 bench/big_shapes.py --out OUT [--parts big,long] [--work /tmp/big-shapes] [--timeout 540]
    python3 bench/big_shapes.py --tiny --out OUT      # the same runs on CPU in about a minute: the tiny shapes

big   bench/synthetic_model.py --nf4 writes llama-3.1-70b pre-quantized in NF4 under WORK (about 40 GB, module by
      module: never in 16-bit), then entrypoint.py trains it with the job's defaults on full 2,048-token rows,
      MAX_STEPS=4 and CHECKPOINT_EVERY_STEPS=2, stopped by SIGTERM once step 2 is logged; the same command again,
      with a fresh SCRATCH_DIR as a new pod has, resumes and publishes.
long  llama-3.1-8b in NF4, then one run at each of MAX_SEQ_LENGTH=16,384 and 32,768 on rows longer than that (every
      sequence full), MAX_STEPS=3, no checkpoints.

With two GPUs the parts run side by side (CUDA_VISIBLE_DEVICES 0 and 1); with one, one after the other, which may
not fit a ten-minute call: run --parts long, then --parts big (a model built under WORK is kept). OUTPUT_URI
is a local folder (the host has no S3): upload seconds are a copy to local disk. Each run's log goes to
OUT/<name>.log, everything measured to OUT/big_shapes.json (rewritten after each run), the table to stdout.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lifecycle import run_job, summarise, versions  # noqa: E402

GRACE = "a SIGTERM needs about"  # the job's line at an attempt's first commit (job/checkpoints.py)
# What each part runs; --tiny keeps the runs and makes the shapes and lengths CPU-sized.
PARTS = {
    "big": {"shape": "llama-3.1-70b", "seq": 2048, "steps": 4, "every": 2, "sigterm_at": 2},
    "long": {"shape": "llama-3.1-8b", "seqs": [16384, 32768], "steps": 3},
}
TINY = {"big": {"seq": 256}, "long": {"seqs": [512, 1024]}}
# Beside the job's defaults: few samples (a 70B generates slowly), and on CPU what the tests train with.
SETTINGS = {"LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NUM_SAMPLE_PROMPTS": "1",
            "MAX_NEW_TOKENS": "16"}  # fmt: skip
CPU = {"TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false", "OPTIMIZER": "adamw_torch"}
RECORDED = ("RUN_ID", "BASE_MODEL", "MAX_SEQ_LENGTH", "MAX_STEPS", "CHECKPOINT_EVERY_STEPS", "CUDA_VISIBLE_DEVICES")


def long_rows(count: int, tokens: int, seed: int = 0) -> list[dict]:
    """Instruction rows whose responses run past `tokens` tokens (a word is at least one token of the synthetic
    tokenizers): every sequence is cut at MAX_SEQ_LENGTH, full."""
    words, rng = (ROOT / "demo" / "instructions.jsonl").read_text().split(), random.Random(seed)
    return [{"instruction": " ".join(rng.choices(words, k=20)), "input": "",
             "output": " ".join(rng.choices(words, k=tokens + tokens // 4))} for _ in range(count)]  # fmt: skip


def build_model(shape: str, work: Path, tiny: bool, env: dict, out: Path) -> tuple[Path, str]:
    """The shape under WORK: NF4 written module by module on the GPU, or the 16-bit tiny model on CPU (the job trains
    no 4-bit model on CPU). Returns the folder and synthetic_model.py's line."""
    path = work / (f"{shape}-tiny" if tiny else f"{shape}-nf4")
    if (path / "config.json").is_file():
        return path, "built before"
    command = [sys.executable, str(ROOT / "bench" / "synthetic_model.py"), "--shape", shape, "--out", str(path)]
    command += ["--tiny"] if tiny else ["--nf4"]
    with (out / f"build-{shape}.log").open("w") as log:
        done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    if done.returncode:
        raise RuntimeError(f"building {shape} failed ({done.returncode}): see {out / f'build-{shape}.log'}")
    return path, done.stdout.strip().splitlines()[-1]


def measure(name: str, env: dict, args, sigterm_at: int | None = None) -> dict:
    """One run of entrypoint.py (bench/lifecycle.py's runner): its summary, metrics.json, the dataset's counts, and
    the grace period line."""
    run_dir = Path(env["OUTPUT_URI"]) / env["RUN_ID"]
    result = run_job(name, env, args.out, run_dir, args.work, sigterm_at, args.timeout)
    summary = summarise(result, run_dir)
    grace = [line for line in result["lines"] if line.get("message", "").startswith(GRACE)]
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    return summary | {
        "name": name,
        "settings": {k: env[k] for k in RECORDED if k in env},
        # The job's own upload times ("checkpoint step-N committed ... in U s"): a stopped attempt has no metrics.json.
        "uploads": [line["upload_seconds"] for line in result["lines"] if "checkpoint_step" in line],
        "metrics_json": json.loads((run_dir / "metrics.json").read_text()) if manifest else None,
        "dataset": manifest.get("dataset"),
        "grace": {k: v for k, v in grace[0].items() if k not in ("time", "level", "stage")} if grace else None,
    }


def big(args, env: dict, report: dict, save) -> None:
    spec = PARTS["big"] | (TINY["big"] if args.tiny else {})
    model, built = build_model(spec["shape"], args.work, args.tiny, env, args.out)
    report["built"][spec["shape"]] = built
    data = args.work / f"rows-{spec['seq']}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in long_rows(spec["steps"] * 8 + 16, spec["seq"])))
    run_id = f"{spec['shape']}-sigterm"
    subprocess.run(["rm", "-rf", str(args.work / "runs" / run_id), str(args.work / "scratch-big-1"),
                    str(args.work / "scratch-big-2")], check=True)  # fmt: skip
    settings = env | {"BASE_MODEL": str(model), "DATASET_URI": str(data), "RUN_ID": run_id,
                      "MAX_SEQ_LENGTH": str(spec["seq"]), "MAX_STEPS": str(spec["steps"]),
                      "CHECKPOINT_EVERY_STEPS": str(spec["every"])}  # fmt: skip
    for attempt, sigterm_at in ((1, spec["sigterm_at"]), (2, None)):
        name = f"{spec['shape']}-attempt{attempt}"
        scratch = {"SCRATCH_DIR": str(args.work / f"scratch-big-{attempt}")}
        report["runs"].append(measure(name, settings | scratch, args, sigterm_at) | {"part": "big"})
        save()


def long(args, env: dict, report: dict, save) -> None:
    spec = PARTS["long"] | (TINY["long"] if args.tiny else {})
    model, built = build_model(spec["shape"], args.work, args.tiny, env, args.out)
    report["built"][spec["shape"]] = built
    for seq in spec["seqs"]:
        data = args.work / f"rows-{seq}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in long_rows(spec["steps"] * 8 + 8, seq)))
        run_id = f"{spec['shape']}-seq{seq}"
        subprocess.run(["rm", "-rf", str(args.work / "runs" / run_id)], check=True)
        settings = env | {"BASE_MODEL": str(model), "DATASET_URI": str(data), "RUN_ID": run_id,
                          "MAX_SEQ_LENGTH": str(seq), "MAX_STEPS": str(spec["steps"]), "CHECKPOINT_EVERY_STEPS": "0",
                          "SCRATCH_DIR": str(args.work / f"scratch-{seq}")}  # fmt: skip
        report["runs"].append(measure(run_id, settings, args) | {"part": "long"})
        save()


def row(run: dict) -> str:
    m, grace, stop = run["metrics_json"] or {}, run["grace"] or {}, run.get("sigterm") or {}
    commits, stalls = [c for c in run["commits"] if "mb" in c], m.get("checkpoint_stall_seconds") or []
    estimate, peak = m.get("estimated_peak_gpu_memory_gib"), m.get("peak_gpu_memory_gib")
    error = f"{estimate / peak - 1:+.1%}" if estimate and peak else ""
    plan = f"{m['micro_batch']} x {m['grad_accum']}, {'on' if m['activation_checkpointing'] else 'off'}" if m else ""
    full = run["dataset"] and f"{run['dataset']['truncated_rows']} of {run['dataset']['train_rows']}"
    cells = [
        run["name"], run["settings"].get("MAX_SEQ_LENGTH"), run["exit_code"], plan, estimate, peak, error,
        m.get("peak_host_memory_gib"), m.get("tokens_per_second"), run["seconds_from_start_to_first_step_line"],
        full or "", ", ".join(str(c["mb"]) for c in commits), ", ".join(map(str, stalls)),
        ", ".join(map(str, run["uploads"])), stop.get("job_says_seconds_to_commit", ""),
        f"{grace['grace_period_needed_seconds']} / {grace['termination_grace_period_seconds']}" if grace else "",
        run["resumed_from_step"] or "",
    ]  # fmt: skip
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def table(report: dict) -> str:
    return "\n".join([
        "| run | MAX_SEQ_LENGTH | exit | micro-batch x accumulation, checkpointing | estimated GiB | peak GiB | "
        "estimate error | host peak GiB | tokens/s | first step line s | rows cut at the length | checkpoint MB | "
        "stall s | upload s (local) | SIGTERM to commit s | grace needed / to set s | resumed from |",
        "|" + "---|" * 17,
        *(row(run) for run in report["runs"]),
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/big-shapes"))
    parser.add_argument("--parts", default="big,long", help="comma list of: big, long")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes and lengths, the hf backend")
    parser.add_argument("--timeout", type=float, default=540, help="seconds before a run is killed")
    args = parser.parse_args()
    for folder in (args.out, args.work):
        folder.mkdir(parents=True, exist_ok=True)
    env = os.environ | SETTINGS | {"OUTPUT_URI": str(args.work / "runs")} | (CPU if args.tiny else {})
    report = {"versions": versions(), "tiny": args.tiny, "built": {}, "runs": []}
    lock = threading.Lock()

    def save() -> None:
        with lock:
            (args.out / "big_shapes.json").write_text(json.dumps(report, indent=1, default=str) + "\n")

    parts = [{"big": big, "long": long}[name] for name in args.parts.split(",")]
    smi = shutil.which("nvidia-smi") if not args.tiny else None
    gpus = len(subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.splitlines()) if smi else 0
    if gpus > 1 and len(parts) > 1:  # side by side, a GPU each
        threads = [threading.Thread(target=part, args=(args, env | {"CUDA_VISIBLE_DEVICES": str(i)}, report, save))
                   for i, part in enumerate(parts)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for part in parts:
            part(args, env, report, save)
    save()
    print(json.dumps(report["built"]), flush=True)
    print(table(report), flush=True)
    expected = {"big": [143, 0], "long": [0, 0]}
    codes = {name: [r["exit_code"] for r in report["runs"] if r["part"] == name] for name in args.parts.split(",")}
    return 0 if all(codes[name] == expected[name] for name in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
