"""Publishing: the run's files to OUTPUT_URI/RUN_ID/, and manifest.json last, so that a run is
complete exactly when its manifest exists."""

import json
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from job import __version__, report
from job.context import ADAPTER, ATTEMPTS, CONFIG, FAILURE, MANIFEST, TRAIN_LOG, Run
from job.storage import describe_file, files_under
from job.train import Metrics

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth", "boto3")


@dataclass
class Summary:
    """Everything the run's report, metrics.json and manifest.json say beside the files themselves."""

    run_id: str
    dry_run: bool
    backend: str
    world_size: int
    base_model: dict
    chat_template: str
    dataset: dict
    samples_seen_in_training: bool
    metrics: Metrics
    timings: dict[str, float]
    attempts: list[dict]
    checkpoints: list[int]  # committed steps at publish; deleted once the manifest is written
    checkpoint_upload_seconds: list[float]  # this attempt's, one per checkpoint
    grace_period_needed_seconds: float | None  # checkpoints.grace_period at this attempt's first commit
    termination_grace_period_seconds: int | None


def write_outputs(stage: Path, summary: Summary, samples: list[dict], config: dict) -> None:
    """samples.jsonl, metrics.json, config.json, attempts.json, loss.png and report.md beside the adapter."""
    (stage / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in samples))
    metrics = asdict(summary.metrics) | {
        "checkpoint_upload_seconds": summary.checkpoint_upload_seconds,
        "grace_period_needed_seconds": summary.grace_period_needed_seconds,
        "termination_grace_period_seconds": summary.termination_grace_period_seconds,
        "seconds_per_stage": summary.timings,
        "attempts": summary.attempts,
    }
    (stage / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (stage / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (stage / ATTEMPTS).write_text(json.dumps(summary.attempts, indent=1) + "\n")
    plot_loss(stage / TRAIN_LOG, stage / "loss.png")
    (stage / "report.md").write_text(report.render(summary, samples, config))
    # The adapter loads anywhere: its base is BASE_MODEL as the user gave it, never the job's scratch folder.
    adapter_config = stage / ADAPTER / "adapter_config.json"
    adapter = json.loads(adapter_config.read_text())
    adapter["base_model_name_or_path"] = summary.base_model["name"]
    adapter_config.write_text(json.dumps(adapter, indent=2) + "\n")
    # The layers adapted, as PEFT saved them (the default LORA_TARGET_MODULES is read per model: model.lora_targets).
    adapted = {"LORA_TARGET_MODULES": sorted(adapter["target_modules"])}
    (stage / ADAPTER / "README.md").write_text(report.model_card(summary, config | adapted))


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


def describe_tree(folder: Path) -> list[dict]:
    """Every file under folder, by its path relative to folder, with its size and sha256."""
    return [describe_file(p, p.relative_to(folder).as_posix()) for p in files_under(folder)]


def manifest(stage: Path, summary: Summary, image_version: str | None) -> dict:
    files = describe_tree(stage)
    return {
        "run_id": summary.run_id,
        "status": "succeeded",
        "dry_run": summary.dry_run,
        "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": summary.dataset,
        "base_model": summary.base_model,
        "chat_template": summary.chat_template,
        "backend": summary.backend,
        "world_size": summary.world_size,
        "training": {
            "packing": summary.metrics.packing,
            "attention": summary.metrics.attention,
            "micro_batch": summary.metrics.micro_batch,
            "grad_accum": summary.metrics.grad_accum,
            "activation_checkpointing": summary.metrics.activation_checkpointing,
        },
        "job_version": __version__,
        "image_version": image_version,
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES if _version(name)},
        "timings": summary.timings,
        "attempts": summary.attempts,
        "checkpoints": {
            "steps": summary.checkpoints,
            "kept": False,
            "why": "deleted once this manifest is written: the adapter is the result, and a checkpoint's "
            "optimizer state only serves to resume an unfinished run",
        },
        "files": files,
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def publish(lease, run: Run, summary: Summary, image_version: str | None) -> None:
    """Uploads every file through the attempt's lease, then manifest.json, which nothing else may have written: the
    lease keeps every other attempt of the run from writing."""
    lease.put_tree(run.stage, run.out)
    lease.delete(run.uri(FAILURE))  # left by an earlier attempt of this run that failed
    body = json.dumps(manifest(run.stage, summary, image_version), indent=2).encode() + b"\n"
    if not lease.put_bytes(body, run.uri(MANIFEST), if_absent=True):
        raise RuntimeError(f"{run.uri(MANIFEST)} was written by another attempt while this one held the run's lease")
