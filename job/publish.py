"""Publishing: the run's files to OUTPUT_URI/RUN_ID/, and manifest.json last, so that a run is
complete exactly when its manifest exists."""

import hashlib
import json
import logging
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from job import __version__, report
from job.storage import Storage, join

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "boto3")


def write_outputs(stage: Path, summary: dict, samples: list[dict], config: dict) -> None:
    """samples.jsonl, metrics.json, config.json, loss.png and report.md beside the adapter in stage."""
    (stage / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    metrics = summary["metrics"] | {"seconds_per_stage": summary["timings"]}
    (stage / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    plot_loss(stage / "train_log.jsonl", stage / "loss.png")
    (stage / "report.md").write_text(report.render(summary, samples, config))


def plot_loss(train_log: Path, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in train_log.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set(xlabel="step", ylabel="loss", title="loss against step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


def describe_file(path: Path, name: str) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def manifest(stage: Path, summary: dict, image_version: str | None) -> dict:
    files = [describe_file(p, p.relative_to(stage).as_posix()) for p in sorted(stage.rglob("*")) if p.is_file()]
    return {
        "run_id": summary["run_id"],
        "status": "succeeded",
        "dry_run": summary["dry_run"],
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": summary["dataset"],
        "base_model": summary["base_model"],
        "backend": summary["backend"],
        "world_size": summary["world_size"],
        "job_version": __version__,
        "image_version": image_version,
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES if _version(name)},
        "timings": summary["timings"],
        "files": files,
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def publish(storage: Storage, stage: Path, out_uri: str, summary: dict, image_version: str | None) -> bool:
    """Uploads every file, then manifest.json if none exists yet; False when another run got there first."""
    storage.put_tree(stage, out_uri)
    storage.delete(join(out_uri, "failure.json"))  # left by an earlier attempt of this run that failed
    body = json.dumps(manifest(stage, summary, image_version), indent=2).encode() + b"\n"
    written = storage.put_bytes(body, join(out_uri, "manifest.json"), if_absent=True)
    if not written:
        log.warning("%s already has a manifest.json: another attempt completed this run first", out_uri)
    return written
