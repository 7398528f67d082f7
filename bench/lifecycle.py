"""The run lifecycle through the real entry point: what a checkpoint costs, and SIGTERM, commit, resume.

    python3 bench/lifecycle.py --shape llama-3-8b --out OUT_DIR [--backend unsloth] [--work /tmp/lifecycle]

Three runs of entrypoint.py on demo/instructions.jsonl, with the job's defaults otherwise and
OUTPUT_URI a local folder (WORK/runs):

  every    MAX_STEPS=20, CHECKPOINT_EVERY_STEPS=5: the training time each save holds up
           (metrics.json's checkpoint_stall_seconds), each checkpoint's size and upload time.
  sigterm  MAX_STEPS=40, CHECKPOINT_EVERY_STEPS=10; SIGTERM once the log shows step 12: exit 143, the
           seconds from the signal to the committed checkpoint (the job's log line, failure.json, and
           the marker's mtime); then the same command again, with a fresh SCRATCH_DIR as a new pod would
           have: exit 0, resumed_from_step, and the time to its first step.

Each run's output goes to OUT_DIR/<part>.log, the measurements to OUT_DIR/lifecycle.json (rewritten after
each run, so that a run cut short still leaves the earlier ones). Any other job setting comes from the
environment (for a CPU check: TRAIN_BACKEND=hf LOAD_IN_4BIT=false OPTIMIZER=adamw_torch, --shape tiny).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "demo" / "instructions.jsonl"
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "datasets")
AFTER_SIGNAL = re.compile(r"\(([\d.]+) s after the signal\)")


def versions() -> dict:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = sys.version.split()[0]
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()  # fmt: skip
        found["gpu"] = gpu.splitlines()[0] if gpu else None
    except (OSError, subprocess.TimeoutExpired):
        found["gpu"] = None
    return found


class Markers(threading.Thread):
    """Watches RUN/checkpoints/step-N/COMMITTED.json while a run goes on: each commit's step, size and time
    (the job deletes older checkpoints as newer ones land, and all of them once the run is published)."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.seen, self.done = folder, {}, threading.Event()
        self.poll()
        self.before = sorted(self.seen)  # committed by an earlier attempt
        self.seen = {}

    def run(self):
        while not self.done.is_set():
            self.poll()
            time.sleep(0.05)
        self.poll()

    def poll(self):
        for marker in self.folder.glob("step-*/COMMITTED.json"):
            step = int(marker.parent.name.split("-")[1])
            if step in self.seen:
                continue
            try:
                mtime = marker.stat().st_mtime
                files = json.loads(marker.read_text())["files"]
            except (OSError, ValueError):
                continue  # being written or deleted; the next poll sees it whole
            self.seen[step] = {"step": step, "committed_at": mtime, "bytes": sum(f["bytes"] for f in files),
                               "files": len(files), "sizes": {f["path"]: f["bytes"] for f in files}}  # fmt: skip


def run_job(name: str, env: dict, out: Path, run_dir: Path, cwd: Path, sigterm_at: int | None = None,
            timeout: float = 540) -> dict:  # fmt: skip
    """Runs entrypoint.py, teeing its output to OUT/name.log; sends SIGTERM once a step >= sigterm_at is logged."""
    markers = Markers(run_dir / "checkpoints")
    markers.start()
    lines, result = [], {"name": name, "env": {k: env[k] for k in sorted(env) if k in JOB_KEYS}}
    started = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py")], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)  # fmt: skip
    killed = []
    killer = threading.Timer(timeout, lambda: (killed.append(True), proc.kill()))
    killer.start()
    with (out / f"{name}.log").open("w") as log:
        for raw in proc.stdout:
            now = time.time()
            log.write(raw)
            log.flush()
            try:
                line = json.loads(raw) if raw.startswith("{") else None
            except ValueError:
                line = None
            if not isinstance(line, dict):
                continue
            line["_received"] = now
            lines.append(line)
            if sigterm_at is not None and "sigterm_sent" not in result and is_step(line) and line["step"] >= sigterm_at:
                proc.send_signal(signal.SIGTERM)
                result["sigterm_sent"] = time.time()
                result["sigterm_after_step"] = line["step"]
    result["exit_code"] = proc.wait()
    result["ended"] = time.time()
    killer.cancel()
    markers.done.set()
    markers.join()
    result |= {"started": started, "wall_seconds": round(result["ended"] - started, 1), "killed": bool(killed)}
    # The commits of this attempt, in the order of its saves (one upload queue): the job's own log lines.
    order = [line["checkpoint_step"] for line in lines if "checkpoint_step" in line]
    result["commits"] = [markers.seen.get(s, {"step": s}) for s in order]
    result["checkpoints_before"] = markers.before
    result["lines"] = lines
    return result


JOB_KEYS = {"BASE_MODEL", "DATASET_URI", "OUTPUT_URI", "RUN_ID", "TRAIN_BACKEND", "MAX_STEPS", "CHECKPOINT_EVERY_STEPS",
            "LOG_FORMAT", "SCRATCH_DIR", "LOAD_IN_4BIT", "OPTIMIZER", "CUDA_VISIBLE_DEVICES"}  # fmt: skip


def is_step(line: dict) -> bool:
    return isinstance(line.get("step"), int) and "loss" in line and "eval_loss" not in line


def step_lines(result: dict) -> list[dict]:
    return [line for line in result["lines"] if is_step(line)]


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def commit_row(commit: dict, t0: float) -> dict:
    if "bytes" not in commit:  # committed and deleted between two polls
        return dict(commit)
    return {"step": commit["step"], "mb": round(commit["bytes"] / 1e6, 1), "files": commit["files"],
            "seconds_from_start": round(commit["committed_at"] - t0, 2), "sizes": commit["sizes"]}  # fmt: skip


def summarise(result: dict, run_dir: Path) -> dict:
    """What a run's log, metrics.json and failure.json say, with times relative to the process start."""
    t0 = result["started"]
    steps = step_lines(result)
    first = steps[0] if steps else None
    resumed = [line for line in result["lines"] if "resumed_from_step" in line]
    errors = [line for line in result["lines"] if line.get("level") == "error"]
    metrics = read_json(run_dir / "metrics.json")
    summary = {
        "exit_code": result["exit_code"],
        "wall_seconds": result["wall_seconds"],
        "env": result["env"],
        "resumed_from_step": resumed[0]["resumed_from_step"] if resumed else None,
        "first_step": first["step"] if first else None,
        "seconds_from_start_to_first_step_line": round(first["time"] - t0, 1) if first else None,
        "last_step": steps[-1]["step"] if steps else None,
        "error": errors[-1]["message"] if errors else None,
        "failure_json": read_json(run_dir / "failure.json"),
        "attempts_json": read_json(run_dir / "attempts.json"),
        "killed_at_timeout": result["killed"],
        "checkpoints_before": result["checkpoints_before"],
        "commits": [commit_row(c, t0) for c in result["commits"]],
        "metrics": {k: metrics.get(k) for k in ("steps", "checkpoint_stall_seconds", "seconds_to_first_step",
                                                 "train_seconds", "tokens_per_second", "peak_gpu_memory_gib",
                                                 "first_loss", "final_loss", "seconds_per_stage", "attempts")}
        if metrics else None,
    }  # fmt: skip
    # Step-to-step intervals: a save delays the next step's log line by its stall.
    at = {line["step"]: line["time"] for line in steps}
    gaps = {s: round(at[s] - at[s - 1], 3) for s in at if s - 1 in at}
    summary["step_gaps"] = gaps
    # A commit's upload: from the end of its save (the step's log line, logged just before the save, plus the
    # stall) to the marker's mtime.
    stalls = dict(zip([c["step"] for c in result["commits"]], (metrics or {}).get("checkpoint_stall_seconds") or []))
    for commit in summary["commits"]:
        step = commit["step"]
        raw = next(c for c in result["commits"] if c["step"] == step)
        if step in at and step in stalls and "committed_at" in raw:
            commit["upload_seconds"] = round(raw["committed_at"] - at[step] - stalls[step], 2)
        if step in stalls:
            commit["stall_seconds"] = stalls[step]
    if "sigterm_sent" in result:
        sent = result["sigterm_sent"]
        message = summary["error"] or ""
        match = AFTER_SIGNAL.search(message)
        stop = summary["failure_json"] or {}
        committed = next((c for c in result["commits"] if c["step"] == stop.get("step")), None)
        summary["sigterm"] = {
            "sent_after_step_line": result["sigterm_after_step"],
            "job_says_seconds_to_commit": float(match[1]) if match else None,
            "marker_mtime_seconds_after_signal": round(committed["committed_at"] - sent, 2)
            if committed and "committed_at" in committed
            else None,
            "exit_seconds_after_signal": round(result["ended"] - sent, 2),
            "committed_step": stop.get("step"),
            "steps_logged_after_signal": [line["step"] for line in steps if line["_received"] > sent],
        }
    return summary


def build_model(shape: str, work: Path) -> Path:
    path = work / shape
    if not (path / "config.json").is_file():
        start = time.time()
        script = str(ROOT / "bench" / "synthetic_model.py")
        subprocess.run([sys.executable, script, "--shape", shape, "--out", str(path)], check=True, cwd=ROOT)
        print(f"built {shape} in {time.time() - start:.0f} s", flush=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default="unsloth")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifecycle"))
    parser.add_argument("--parts", nargs="+", default=["every", "sigterm"], choices=["every", "sigterm"])
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a run is killed")
    parser.add_argument("--every", type=int, nargs=2, default=[20, 5], metavar=("MAX_STEPS", "EVERY"))
    parser.add_argument("--sigterm", type=int, nargs=3, default=[40, 10, 12], metavar=("MAX_STEPS", "EVERY", "AT_STEP"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"shape": args.shape, "backend": args.backend, "versions": versions()}
    print(json.dumps(report["versions"]), flush=True)
    report["model"] = str(build_model(args.shape, args.work))
    runs = args.work / "runs"
    base_env = os.environ | {
        "BASE_MODEL": report["model"], "DATASET_URI": str(DATA), "OUTPUT_URI": str(runs),
        "TRAIN_BACKEND": args.backend, "LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    save = lambda: (args.out / "lifecycle.json").write_text(json.dumps(report, indent=1) + "\n")  # noqa: E731
    status = 0

    def job(name, run_id, scratch, sigterm_at=None, **settings):
        env = (
            base_env
            | {"RUN_ID": run_id, "SCRATCH_DIR": str(args.work / scratch)}
            | {k: str(v) for k, v in settings.items()}
        )
        result = run_job(name, env, args.out, runs / run_id, args.work, sigterm_at, args.timeout)
        report[name] = summarise(result, runs / run_id)
        save()
        print(
            f"{name}: {json.dumps({k: v for k, v in report[name].items() if k not in ('env', 'step_gaps')})}",
            flush=True,
        )
        return report[name]

    if "every" in args.parts:
        steps, every_n = args.every
        run_id = f"{args.shape}-{args.backend}-every{every_n}"
        subprocess.run(["rm", "-rf", str(runs / run_id), str(args.work / "scratch-every")], check=True)
        every = job("every", run_id, "scratch-every", MAX_STEPS=steps, CHECKPOINT_EVERY_STEPS=every_n)
        stalls = (every["metrics"] or {}).get("checkpoint_stall_seconds") or []
        every["stall_median"] = statistics.median(stalls) if stalls else None
        save()
        status |= every["exit_code"] != 0

    if "sigterm" in args.parts:
        steps, every_n, at = args.sigterm
        run_id = f"{args.shape}-{args.backend}-sigterm"
        subprocess.run(["rm", "-rf", str(runs / run_id), str(args.work / "scratch-a1"), str(args.work / "scratch-a2")],
                       check=True)  # fmt: skip
        first = job(
            "sigterm_attempt1", run_id, "scratch-a1", sigterm_at=at, MAX_STEPS=steps, CHECKPOINT_EVERY_STEPS=every_n
        )
        # What the stopped run left in OUTPUT_URI: the committed checkpoints a new attempt may resume from.
        first["left_in_output"] = sorted(
            p.parent.name for p in (runs / run_id / "checkpoints").glob("step-*/COMMITTED.json")
        )
        save()
        second = job("sigterm_attempt2", run_id, "scratch-a2", MAX_STEPS=steps, CHECKPOINT_EVERY_STEPS=every_n)
        committed = (first["failure_json"] or {}).get("step")
        second["resumed_as_expected"] = committed is not None and second["resumed_from_step"] == committed
        second["first_step_is_next"] = committed is not None and second["first_step"] == committed + 1
        save()
        status |= first["exit_code"] != 143 or second["exit_code"] != 0 or not second["resumed_as_expected"]
    print(f"lifecycle: {'ok' if not status else 'FAILED'}; {args.out / 'lifecycle.json'}", flush=True)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
