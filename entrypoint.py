"""Runs one fine-tuning job, configured by environment variables (every one is in env.example).

    DATASET_URI=s3://bucket/data.jsonl OUTPUT_URI=s3://bucket/runs python entrypoint.py
    DRY_RUN=true DATASET_URI=./data OUTPUT_URI=./out python entrypoint.py     # CPU, tiny model, seconds

Exit codes: 0 done (or already complete), 1 unexpected, 65 dataset invalid, 66 input not found, 70 GPU out of
memory, 75 temporary (storage unreachable, or another attempt holds the run), 77 permission denied,
78 configuration invalid, 130 stopped by SIGINT (Ctrl-C) and 143 by SIGTERM, after committing a checkpoint.
"""

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from job import (
    checkpoints,
    data,
    distributed,
    export,
    kernels,
    launch,
    logs,
    memory,
    model,
    preemption,
    publish,
    runs,
    samples,
    templates,
    train,
)
from job.context import ADAPTER, CHECKPOINTS, CONFIG, Device, Run
from job.errors import ConfigInvalid, JobError, OutOfMemory, redact
from job.settings import Settings, read_settings
from job.storage import Storage, is_hub, is_s3, join

log = logging.getLogger("job")

# What failure.json's "class" says for each exit code.
CLASSES = {1: "unexpected", 65: "dataset_invalid", 66: "input_not_found", 70: "out_of_memory", 75: "temporary",
           77: "access_denied", 78: "config_invalid", 130: "interrupted", 143: "preempted"}  # fmt: skip


@dataclass(frozen=True)
class Inputs:
    """What the inputs stage read: the dataset's rows (Arrow files on this node's scratch volume, memory-mapped) and
    their folder, their format, the sample prompts, and the dataset files' hashes."""

    rows: object  # datasets.Dataset of examples (data.to_example)
    folder: Path
    format: str
    sample_prompts: list[dict]
    files: list[dict]


@dataclass(frozen=True)
class Resume:
    """The newest committed checkpoint of the run, downloaded: its step and local folder, or None for both."""

    step: int | None
    folder: Path | None


@dataclass(frozen=True)
class Data:
    """The data stage's result: the tokenizer with its template, the tokenized rows, what the samples ask, and the
    batch plan that fits them."""

    tokenizer: object
    template: str | None  # the template the job chose; None: the tokenizer's own
    train: object  # datasets.Dataset
    eval: object | None
    train_rows: int
    eval_rows: int
    lengths: dict  # data.check_lengths
    sample_inputs: list[dict]
    quantized: bool  # BASE_MODEL's checkpoint holds 4-bit weights
    plan: memory.Plan


def main() -> int:
    try:
        settings = read_settings()
    except ConfigInvalid as exc:  # reported in the format asked for, when that much could be read
        fmt = os.environ.get("LOG_FORMAT", "auto").strip().lower()
        logs.setup(fmt if fmt in ("json", "text") else "auto")
        known = exc.settings if exc.settings is not None and exc.settings.RUN_ID else None  # where failure.json goes
        return fail(exc, known and Storage(known), known and join(known.OUTPUT_URI, known.RUN_ID))
    logs.setup(settings.LOG_FORMAT, settings.RANK if settings.WORLD_SIZE > 1 else None)
    models = (settings.BASE_MODEL, settings.BASE_MODEL_16BIT)
    hub_data = is_hub(settings.DATASET_URI) or is_hub(settings.SAMPLE_PROMPTS_URI or "")
    if all(is_s3(uri) or Path(uri).is_dir() for uri in models if uri) and not hub_data:
        # Nothing to fetch from the Hub: never wait on its retries (before huggingface_hub reads this, on import).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if settings.DRY_RUN:  # it asks the Hub nothing (model.fetch_base): nor do usage reports (TRL's, the Hub's)
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if launch.wanted(settings):
        return launch.torchrun(settings)
    preemption.install()
    storage = Storage(settings)
    out = join(settings.OUTPUT_URI, settings.RUN_ID) if settings.RUN_ID else None  # else known once hashed
    lease = None  # rank 0's, once taken: every write to the run's folder goes through it
    try:
        device = Device.detect(settings)  # imports torch: seconds in which a signal must end as any failure does
        distributed.setup(device)
        # The run's identity hashes the dataset's listing (keys, ETags, sizes), not its download.
        dataset = distributed.share(device, lambda: storage.identify(settings.DATASET_URI))
        run_id = settings.run_id(dataset)
        out = join(settings.OUTPUT_URI, run_id)
        run = Run.build(settings, run_id, device, model.resolve_backend(settings, device))
        config = settings.public() | {"RUN_ID": run.id, runs.DATASET_FILES: dataset}
        if distributed.share(device, lambda: already_complete(storage, run, config)):
            log.info("%s is already complete (manifest.json exists): nothing to do", run.out)
            return 0
        # Taking the lease is the first write: a missing bucket or a denied write fails here, before any download,
        # and a second attempt of the run waits or exits 75.
        taking = runs.Lease(storage, run.out, settings.LEASE_SECONDS) if device.rank_zero else None
        distributed.share(device, lambda: taking.acquire())
        lease = taking
        if distributed.share(device, lambda: runs.complete(storage, run.out, lease)):  # while this one waited
            log.info("%s was completed by another attempt while this one waited: nothing to do", run.out)
            return 0
        return attempt(settings, storage, run, config, lease)
    except (Exception, preemption.Stop) as exc:  # failure.json (rank 0's) and a termination message for each
        busy = isinstance(exc, runs.RunBusy)  # the run is another attempt's: its folder is not ours to write
        writes = settings.RANK == 0 and not busy  # rank 0 alone writes the run's folder (Device.rank_zero)
        return fail(as_job_error(exc, settings), storage if writes else None, out, lease)
    finally:
        if lease is not None:
            lease.release()


def already_complete(storage: Storage, run: Run, config: dict) -> bool:
    runs.check_same_run(storage, run, config)
    return runs.complete(storage, run.out)


def attempt(settings: Settings, storage: Storage, run: Run, config: dict, lease: runs.Lease | None) -> int:
    """The run's stages (README: Flow) in this attempt, which holds the run's lease (rank 0)."""
    device, timings = run.device, {}
    log.info("run %s -> %s (backend %s%s)", run.id, run.out, run.backend, ", dry run" if run.dry_run else "")

    with logs.stage("resume", timings):
        resume = start_attempt(settings, storage, run, config, lease)
    with logs.stage("inputs", timings):
        inputs = read_inputs(settings, storage, run, config[runs.DATASET_FILES])
        base = model.fetch_base(settings, storage, device, run.scratch / "base_model")
    with logs.stage("data", timings):
        prepared = prepare_data(settings, run, base, inputs)
    with logs.stage("model", timings):
        lm = model.load(settings, device, base, prepared.tokenizer, run.backend, prepared.plan.checkpointing)

    uploader = checkpoints.Uploader(lease, run, settings.CHECKPOINT_KEEP) if device.rank_zero else None
    with logs.stage("train", timings):
        metrics = train.train(settings, run, prepared.plan, lm, prepared.tokenizer, prepared.train, prepared.eval,
                              resume.folder, uploader, lease)  # fmt: skip
    # Leave the process group together: rank 0 samples and publishes alone, and a rank that left early
    # would abort the others' gloo or NCCL threads.
    distributed.teardown(device)
    if metrics.stopped_early or preemption.requested():
        return stop_early(run, uploader)
    if not device.rank_zero:
        return 0

    with logs.stage("samples", timings):
        rows = samples.generate(lm, prepared.tokenizer, run.stage / ADAPTER, prepared.sample_inputs,
                                settings.MAX_NEW_TOKENS, run.backend)  # fmt: skip
    if settings.EXPORT == "merged_16bit":
        with logs.stage("export", timings):
            if settings.LOAD_IN_4BIT:  # the 16-bit base is loaded next: the training model's memory goes first
                lm = None
            export.merge(settings, storage, run, lm, prepared.tokenizer, prepared.quantized)
    with logs.stage("publish", timings):
        with preemption.deferred():  # the last checkpoints, so that the manifest can say what became of them
            uploader.drain()
        if preemption.requested():  # during samples or the wait: a resume from the final step only publishes
            return stop_early(run, uploader)
        summary = summarize(settings, storage, run, inputs, base, prepared, metrics, timings, uploader)
        publish.write_outputs(run.stage, summary, rows, config)
        publish.publish(lease, run, summary, settings.IMAGE_VERSION)
    try:  # the adapter is the result; a checkpoint's optimizer state only serves a resume, and storage costs money
        lease.delete_tree(run.uri(CHECKPOINTS))
    except JobError as exc:  # the run is complete: its next attempt removes them (runs.complete)
        log.warning("could not delete %s (%s); a rerun of this RUN_ID removes them", run.uri(CHECKPOINTS), exc)
    log.info(
        "done in %.0f s: loss %s -> %s, eval loss %s, %d steps, %d rows and %d tokens at %s tokens/s; report %s, "
        "adapter %s", time.time() - logs.STARTED, _num(metrics.first_loss), _num(metrics.final_loss),
        _num(metrics.eval_loss), metrics.steps, metrics.rows, metrics.tokens, metrics.tokens_per_second,
        run.uri("report.md"), run.uri(ADAPTER), extra={"fields": {"metrics": metrics.__dict__}},
    )  # fmt: skip
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def start_attempt(settings: Settings, storage: Storage, run: Run, config: dict, lease) -> Resume:
    """The resume stage: rank 0 makes the stage folder, records the configuration and this attempt in the run's
    folder and downloads the newest committed checkpoint; every other node's local rank 0 downloads it too."""

    def rank_zero() -> Resume:
        make_stage_dir(settings, run.stage)
        lease.put_bytes(json.dumps(config, indent=2).encode() + b"\n", run.uri(CONFIG))
        step, folder = checkpoints.newest(storage, run)
        started = datetime.now(UTC).isoformat(timespec="seconds")
        runs.record_attempt(lease, run, lease.attempt | {"started_at": started, "resumed_from_step": step})
        if step is None:
            log.info("no committed checkpoint in %s: training from step 1", run.uri(CHECKPOINTS))
        else:
            log.info("resuming from step %d (%s)", step, run.uri(CHECKPOINTS, f"step-{step}"),
                     extra={"fields": {"resumed_from_step": step}})  # fmt: skip
        return Resume(step, folder)

    device = run.device
    resume = distributed.share(device, rank_zero)
    another_node = resume.step is not None and device.local_zero and not device.rank_zero
    distributed.together(device, lambda: checkpoints.restore(storage, run, resume.step), here=another_node)
    return resume


def prepare_data(settings: Settings, run: Run, base: model.Base, inputs: Inputs) -> Data:
    """The data stage: the tokenizer and its template, the rows split and tokenized, the sample inputs, and the batch
    plan. It ends before any weight is loaded, so that a configuration that cannot fit exits 70 here, and a LORA_R
    above the model's layers or an export that could only merge into 4-bit weights 78."""
    rows = inputs.rows
    train_rows, held_out = data.split(len(rows), settings.EVAL_FRACTION, settings.SEED)
    # A tokenizer learned from the data (a dry run's, when BASE_MODEL's is out of reach) learns from a sample: a view
    # of the rows, read only then.
    tokenizer = model.load_tokenizer(settings, base, rows.select(train_rows[: data.DRY_RUN_ROWS]))
    template = templates.choose(tokenizer, settings.CHAT_TEMPLATE, inputs.format)
    tokenizer.chat_template = template or tokenizer.chat_template
    model_config = model.config_of(base, settings)  # read once: packing, the LORA_R bound, the plan and the export
    packing = settings.PACKING and kernels.packs_apart(model_config)
    if settings.PACKING and not packing and run.device.rank_zero:
        log.warning("PACKING=true: %s builds its attention mask without position_ids, so packed rows would attend to "
                    "each other: training one row per sequence", model_config.model_type)  # fmt: skip
    train_ds, eval_ds, lengths = tokenize_rows(settings, run, inputs.folder, rows, tokenizer, train_rows, held_out,
                                               packing)  # fmt: skip
    asked = held_out if len(held_out) else train_rows
    prompt_rows = inputs.sample_prompts or rows.select(asked[: settings.NUM_SAMPLE_PROMPTS]).to_list()
    exporting = settings.EXPORT == "merged_16bit"
    quantized = getattr(model_config, "quantization_config", None) is not None  # a pre-quantized checkpoint
    if exporting and not run.dry_run:
        export.source_16bit(settings, quantized)
    row_tokens = settings.MAX_SEQ_LENGTH if packing else min(settings.MAX_SEQ_LENGTH, lengths["longest"])
    plan = memory.plan(settings, run.device, run.backend, model_config, row_tokens)
    log.info(
        "batch: %d sequences per step per GPU as %d x %d, activation checkpointing %s (%s; estimated peak %s "
        "GiB, %s GiB free)", plan.micro_batch * plan.grad_accum, plan.micro_batch, plan.grad_accum,
        "on" if plan.checkpointing else "off", plan.reason, plan.estimate_gib, plan.free_gib,
        extra={"fields": {"plan": plan.fields()}},
    )  # fmt: skip
    return Data(tokenizer, template, train_ds, eval_ds, len(train_rows), len(held_out), lengths,
                data.sample_inputs(tokenizer, prompt_rows), quantized, plan)  # fmt: skip


def tokenize_rows(settings: Settings, run: Run, folder: Path, rows, tokenizer, train_rows, held_out,
                  packing: bool) -> tuple:  # fmt: skip
    """The training and held-out rows tokenized (and packed, when packing), and the training rows'
    data.check_lengths: once per run, by one rank per node into the run's scratch folder beside the rows, where a
    restarted attempt finds them; every rank maps the files. A dry run tokenizes a random sample of data.DRY_RUN_ROWS
    training rows (its steps read a few) and estimates the counts from it."""
    device, responses_only, max_seq_length = run.device, settings.TRAIN_ON_RESPONSES_ONLY, settings.MAX_SEQ_LENGTH
    train, held = train_rows, held_out
    if run.dry_run:
        train, held = train_rows[: data.DRY_RUN_ROWS], held_out[: data.DRY_RUN_EVAL_ROWS]
    tokens = data.tokens_folder(folder, tokenizer, responses_only, settings.EVAL_FRACTION, settings.SEED,
                                max_seq_length, len(train), len(held), packing)  # fmt: skip
    distributed.together(
        device,
        lambda: data.tokenize_split(
            tokenizer, rows, train, held, responses_only, max_seq_length, tokens, settings.DATA_WORKERS, packing
        ),
        here=device.local_zero,
    )
    train_ds, eval_ds, lengths = data.open_tokens(tokens)
    sampled = len(train) < len(train_rows)
    lengths = data.estimate(lengths, len(train_rows)) if sampled else lengths | {"estimated_from": None}
    estimated = f" (estimated from {len(train)} of them)" if sampled else ""
    fields = {"truncated_rows": lengths["truncated"], "truncated_rows_estimated_from": lengths["estimated_from"]}
    log.info("%d of %d training rows are longer than MAX_SEQ_LENGTH=%d%s", lengths["truncated"], len(train_rows),
             max_seq_length, estimated, extra={"fields": fields})  # fmt: skip
    return train_ds, eval_ds, lengths


def summarize(
    settings: Settings,
    storage: Storage,
    run: Run,
    inputs: Inputs,
    base: model.Base,
    prepared: Data,
    metrics,
    timings: dict,
    uploader: checkpoints.Uploader,
) -> publish.Summary:
    """What the report, metrics.json and the manifest say of this run beside its files."""
    return publish.Summary(
        run_id=run.id,
        dry_run=run.dry_run,
        backend=run.backend,
        world_size=run.device.world_size,
        base_model={"name": settings.BASE_MODEL, "loaded": base.describe()},
        chat_template=settings.CHAT_TEMPLATE if prepared.template is None else templates.name(prepared.template),
        dataset={
            "uri": settings.DATASET_URI,
            "format": inputs.format,
            "rows": len(inputs.rows),
            "train_rows": prepared.train_rows,
            "eval_rows": prepared.eval_rows,
            "truncated_rows": prepared.lengths["truncated"],
            "truncated_rows_estimated_from": prepared.lengths["estimated_from"],  # rows; None: every row counted
            "rows_without_trained_tokens": prepared.lengths["no_trained_tokens"],
            "train_tokens": prepared.lengths["tokens"],
            "train_loss_tokens": prepared.lengths["loss_tokens"],
            "files": inputs.files,
        },
        samples_seen_in_training=not inputs.sample_prompts and not prepared.eval_rows,
        metrics=metrics,
        timings=timings,
        attempts=runs.attempts(storage, run),
        checkpoints=checkpoints.committed_steps(storage, run),
        checkpoint_upload_seconds=uploader.seconds,
        grace_period_needed_seconds=uploader.grace_needed,
        termination_grace_period_seconds=uploader.grace_to_set,
    )


def stop_early(run: Run, uploader) -> int:
    """After SIGTERM or SIGINT: wait for the checkpoint of the step reached to be committed, then stop."""
    if uploader is None:  # ranks other than 0 leave the commit and the report to rank 0
        raise preemption.stopped()
    with preemption.deferred():
        uploader.drain()
    step, seconds = max(uploader.committed, default=None), round(preemption.seconds_since_request(), 1)
    where = f"{run.uri(CHECKPOINTS, f'step-{step}')}" if step else "nowhere (checkpoints are off)"
    raise preemption.stopped(
        f"; the checkpoint of step {step} is committed to {where} ({seconds} s after the signal): the next attempt "
        "resumes from it",
        step=step,
        seconds_after_signal=seconds,
    )


def read_inputs(settings: Settings, storage: Storage, run: Run, listing: list[dict]) -> Inputs:
    """The dataset's rows, validated into Arrow files on each node's scratch volume by its local rank 0 (the other
    ranks wait, then map them), unless an earlier attempt left them there; rank 0's sample prompts."""
    device, folder = run.device, data.rows_folder(run.scratch, listing, settings.DATASET_FORMAT)

    def build() -> None:
        if data.rows_built(folder):
            log.info("inputs: reusing the rows of %s read by an earlier attempt from %s", settings.DATASET_URI, folder)
        else:
            files = storage.locate(settings.DATASET_URI, run.scratch / "dataset")
            data.build_rows(files, settings.DATASET_FORMAT, folder)

    distributed.together(device, build, here=device.local_zero)
    rows, info = data.open_rows(folder)
    prompts = settings.SAMPLE_PROMPTS_URI

    def read_prompts() -> list[dict]:
        files = storage.locate(prompts, run.scratch / "prompts")
        return [row for source, path in files for row in data.read_sample_prompts(source, path, info["format"])]

    sample_prompts = distributed.share(device, read_prompts) if prompts else []
    return Inputs(rows, folder, info["format"], sample_prompts, info["files"])


def make_stage_dir(settings: Settings, stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
    except OSError as exc:
        raise ConfigInvalid(
            f"SCRATCH_DIR={settings.SCRATCH_DIR} is not writable ({exc.strerror}): mount a writable volume there "
            "(an emptyDir, --tmpfs /scratch) or point SCRATCH_DIR at one"
        ) from None


def as_job_error(exc: BaseException, settings: Settings) -> Exception:
    if isinstance(exc, preemption.Stop):
        return preemption.stopped(" outside training: the next attempt resumes from the last checkpoint")
    # torch.OutOfMemoryError, matched by name so that this module imports without torch.
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return OutOfMemory(
            f"GPU out of memory: lower PER_DEVICE_BATCH_SIZE (now {settings.PER_DEVICE_BATCH_SIZE}) and raise "
            f"GRAD_ACCUM_STEPS (now {settings.GRAD_ACCUM_STEPS}) to keep the batch, or lower MAX_SEQ_LENGTH "
            f"(now {settings.MAX_SEQ_LENGTH})"
        )
    if not isinstance(exc, JobError):
        log.exception("unexpected error")
    return exc


def fail(exc: Exception, storage: Storage | None, out: str | None, lease: runs.Lease | None = None) -> int:
    """Reports a failure everywhere it is looked for: the log, the termination message, torchrun's error file, and
    failure.json in the run's folder when storage and out are given and this attempt may still write there
    (runs.write_failure). Returns the exit code."""
    code = exc.exit_code if isinstance(exc, JobError) else 1
    kind = type(exc).__name__
    message = redact(str(exc) if isinstance(exc, JobError) else f"{kind}: {exc}")
    log.error("%s", message, extra={"fields": {"exit_code": code, "error": kind}})
    launch.report(code, f"{kind}: {message}")
    record = {"exit_code": code, "class": CLASSES.get(code, "unexpected"), "error": kind,
              "stage": logs.current_stage(), "message": message}  # fmt: skip
    record |= getattr(exc, "fields", {})
    # Kubernetes mounts this file; elsewhere it is absent. Read as configuration errors are: with no Settings.
    default = Settings.model_fields["TERMINATION_MESSAGE_PATH"].default
    termination_log = Path(os.environ.get("TERMINATION_MESSAGE_PATH") or default)
    if termination_log.is_file():
        termination_log.write_text(f"exit {code} {kind}: {message}"[:4000] + "\n")
    if storage is not None and out is not None:
        with preemption.deferred():  # a second SIGTERM must not cut the record short
            runs.write_failure(storage, out, record, lease)
    return code


if __name__ == "__main__":
    sys.exit(main())
