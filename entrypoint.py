"""Runs one fine-tuning job, configured by environment variables (see env.example and shared/DESIGN.md).

    DATASET_URI=s3://bucket/data.jsonl OUTPUT_URI=s3://bucket/runs python entrypoint.py
    DRY_RUN=true DATASET_URI=./data OUTPUT_URI=./out python entrypoint.py     # CPU, tiny model, seconds

Exit codes: 0 done, 1 unexpected, 65 dataset invalid, 66 input not found, 70 GPU out of memory,
75 storage unreachable (retry), 77 permission denied, 78 configuration invalid.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

from job import data, distributed, logs, model, publish, samples, train
from job.errors import ConfigInvalid, GpuOutOfMemory, JobError
from job.settings import Settings, read_settings
from job.storage import Storage, join

log = logging.getLogger("job")


def main() -> int:
    try:
        settings = read_settings()
    except ConfigInvalid as exc:
        logs.setup("auto")
        return fail(exc, None, None)
    logs.setup(settings.LOG_FORMAT, settings.RANK if settings.WORLD_SIZE > 1 else None)
    storage = Storage(settings)
    out = join(settings.OUTPUT_URI, settings.run_id())
    try:
        return run(settings, storage, out)
    except Exception as exc:  # every failure leaves failure.json (rank 0's) and a termination message
        return fail(as_job_error(exc, settings), storage if settings.RANK == 0 else None, out)


def run(settings: Settings, storage: Storage, out: str) -> int:
    distributed.setup(settings)
    main = settings.RANK == 0  # under torchrun, rank 0 alone reads the dataset and writes outputs
    if distributed.share(settings, lambda: storage.exists(join(out, "manifest.json"))):
        log.info("%s is already complete (manifest.json exists): nothing to do", out)
        return 0
    backend = model.resolve_backend(settings)
    scratch = Path(settings.SCRATCH_DIR) / settings.run_id()
    stage = scratch / "output"
    if main:
        make_stage_dir(settings, stage)
    log.info("run %s -> %s (backend %s%s)", settings.run_id(), out, backend, ", dry run" if settings.DRY_RUN else "")
    timings: dict[str, float] = {}

    with logs.stage("inputs", timings):
        inputs = distributed.share(settings, lambda: read_inputs(settings, storage, scratch))
        base = model.fetch_base(settings, storage, scratch / "base_model")

    with logs.stage("data", timings):
        examples, fmt = inputs["examples"], inputs["format"]
        tokenizer = model.load_tokenizer(settings, base, examples)
        template = data.choose_template(tokenizer, settings.CHAT_TEMPLATE, fmt)
        tokenizer.chat_template = template or tokenizer.chat_template
        train_rows, held_out = data.split(examples, settings.EVAL_FRACTION, settings.SEED)
        train_ds = data.tokenize(tokenizer, train_rows, settings.TRAIN_ON_RESPONSES_ONLY)
        eval_ds = data.tokenize(tokenizer, held_out, settings.TRAIN_ON_RESPONSES_ONLY) if held_out else None
        prompt_rows = inputs["sample_prompts"] or (held_out or train_rows)[: settings.NUM_SAMPLE_PROMPTS]
        sample_inputs = data.sample_inputs(tokenizer, prompt_rows)

    with logs.stage("model", timings):
        lm = model.load(settings, base, tokenizer, backend)

    with logs.stage("train", timings):
        metrics = train.train(settings, lm, tokenizer, train_ds, eval_ds, stage, scratch / "checkpoints", backend)
    # Leave the process group together: rank 0 samples and publishes alone, and a rank that left early
    # would abort the others' gloo or NCCL threads.
    distributed.teardown(settings)
    if not main:
        return 0

    with logs.stage("samples", timings):
        rows = samples.generate(lm, tokenizer, stage / "adapter", sample_inputs, settings.MAX_NEW_TOKENS, backend)

    with logs.stage("publish", timings):
        summary = {
            "run_id": settings.run_id(),
            "dry_run": settings.DRY_RUN,
            "backend": backend,
            "world_size": settings.WORLD_SIZE,
            "base_model": {"name": settings.BASE_MODEL, "loaded": base.describe()},
            "chat_template": settings.CHAT_TEMPLATE if template is None else data.template_name(template),
            "dataset": {
                "uri": settings.DATASET_URI,
                "format": fmt,
                "rows": len(examples),
                "train_rows": len(train_rows),
                "eval_rows": len(held_out),
                "files": inputs["files"],
            },
            "samples_seen_in_training": not inputs["sample_prompts"] and not held_out,
            "metrics": metrics,
            "timings": timings,
        }
        publish.write_outputs(stage, summary, rows, settings.public())
        publish.publish(storage, stage, out, summary, settings.IMAGE_VERSION)
    log.info("done: %s/report.md", out, extra={"fields": {"metrics": metrics}})
    return 0


def read_inputs(settings: Settings, storage: Storage, scratch: Path) -> dict:
    """The dataset's rows and format, the sample prompts, and the dataset files' identity (rank 0's reads)."""
    data_files = storage.fetch(settings.DATASET_URI, scratch / "dataset")
    prompts = settings.SAMPLE_PROMPTS_URI
    prompt_files = storage.fetch(prompts, scratch / "prompts") if prompts else []
    examples, fmt = data.load_examples(data_files, settings.DATASET_FORMAT)
    return {
        "examples": examples,
        "format": fmt,
        "sample_prompts": [row for source, path in prompt_files for row in data.read_sample_prompts(source, path, fmt)],
        "files": [publish.describe_file(path, source) for source, path in data_files],
    }


def make_stage_dir(settings: Settings, stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
    except OSError as exc:
        raise ConfigInvalid(
            f"SCRATCH_DIR={settings.SCRATCH_DIR} is not writable ({exc.strerror}): mount a writable volume there "
            "(an emptyDir, --tmpfs /scratch) or point SCRATCH_DIR at one"
        ) from None


def as_job_error(exc: Exception, settings: Settings) -> Exception:
    # torch.OutOfMemoryError, matched by name so that this module imports without torch.
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return GpuOutOfMemory(
            f"GPU out of memory: lower PER_DEVICE_BATCH_SIZE (now {settings.PER_DEVICE_BATCH_SIZE}) and raise "
            f"GRAD_ACCUM_STEPS (now {settings.GRAD_ACCUM_STEPS}) to keep the batch, or lower MAX_SEQ_LENGTH "
            f"(now {settings.MAX_SEQ_LENGTH})"
        )
    if not isinstance(exc, JobError):
        log.exception("unexpected error")
    return exc


def fail(exc: Exception, storage: Storage | None, out: str | None) -> int:
    """Reports a failure everywhere it is looked for; returns the exit code."""
    code = exc.exit_code if isinstance(exc, JobError) else 1
    kind = type(exc).__name__
    message = str(exc) if isinstance(exc, JobError) else f"{kind}: {exc}"
    log.error("%s", message, extra={"fields": {"exit_code": code, "error": kind}})
    record = {"exit_code": code, "error": kind, "stage": logs.current_stage(), "message": message}
    termination_log = Path("/dev/termination-log")  # Kubernetes mounts this file; elsewhere it is absent
    if termination_log.is_file():
        termination_log.write_text(f"exit {code} {kind}: {message}"[:4000] + "\n")
    if storage is not None and out is not None and code != 75:
        try:
            storage.put_bytes(json.dumps(record, indent=2).encode() + b"\n", join(out, "failure.json"))
        except Exception as write_error:  # the output itself may be what failed
            log.warning("could not write failure.json: %s", str(write_error).splitlines()[0][:200])
    return code


if __name__ == "__main__":
    sys.exit(main())
