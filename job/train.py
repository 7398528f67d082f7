"""Training: TRL's SFTTrainer with the contract's hyperparameters, logging one line per step, committing
checkpoints to OUTPUT_URI and stopping cleanly on SIGTERM."""

import json
import logging
import os
import re
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from job import data, distributed, kernels, logs, preemption
from job.context import ADAPTER, TENSORBOARD, TRAIN_LOG, Run
from job.errors import AccessDenied, ConfigInvalid, TemporaryFailure, first_line, redact

log = logging.getLogger(__name__)

# Seconds after training begins without a finished step before the log says where the main thread is: the first step
# came 4 to 12 s after the trainer started for the 8B shapes on an H200 (docs/benchmarks.md); a compile that never
# ends (Gemma 3's flex masks on torch 2.11, 2026-12-05) looks like a silent pod otherwise.
FIRST_STEP_WAIT = 300


@dataclass
class Metrics:
    """What training measured; metrics.json and the report show it."""

    steps: int
    epochs: float
    train_loss: float | None
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    rows: int  # rows trained: epochs x the training rows
    tokens: int  # tokens read (not padding; prompts too: report.py says how many were in the loss)
    tokens_per_second: float | None
    train_seconds: float
    seconds_to_first_step: float | None  # from the process's start: what a (re)started pod waits
    packing: str
    attention: str  # the kernel the batches ran on (kernels.py): packed rows' cost depends on it
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    estimated_peak_gpu_memory_gib: float | None
    peak_gpu_memory_gib: float | None
    peak_host_memory_gib: float
    checkpoint_stall_seconds: list[float]
    stopped_early: bool


def sft_config(settings, run: Run, plan, has_eval: bool, rows: int = 0, one_length: bool = False,
               packed: bool = False):  # fmt: skip
    """TRL's configuration of the run; rows: the training rows (TRL's workers for labelling and truncating unpacked
    rows); one_length: packed batches padded to the largest (micro-batch x MAX_SEQ_LENGTH tokens), for models
    compiled per length (kernels.compiles_per_length); packed: the datasets are data.pack's, which neither TRL nor
    unsloth prepares again (unsloth would label and pack them in one process: minutes for a million rows)."""
    from trl import SFTConfig

    cuda, bf16 = run.device.cuda, run.device.bf16
    return SFTConfig(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        max_steps=settings.MAX_STEPS or -1,
        num_train_epochs=settings.NUM_EPOCHS,
        warmup_steps=settings.WARMUP_STEPS,
        learning_rate=settings.LEARNING_RATE,
        weight_decay=settings.WEIGHT_DECAY,
        lr_scheduler_type=settings.LR_SCHEDULER,
        optim=settings.OPTIMIZER,
        seed=settings.SEED,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        max_length=settings.MAX_SEQ_LENGTH,
        packing=packed,
        dataset_kwargs={"skip_prepare_dataset": True} if packed else None,
        pad_to_multiple_of=plan.micro_batch * settings.MAX_SEQ_LENGTH if one_length else None,
        # unsloth checkpoints activations itself (model.load_unsloth); hf needs the trainer's.
        gradient_checkpointing=cuda and run.backend == "hf" and plan.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if has_eval else "no",
        eval_steps=0.2,  # a fraction: five evaluations over the run, whatever its length
        # Checkpoints go to OUTPUT_URI (checkpoints.Uploader), which also prunes them; a SIGTERM saves one
        # whatever this says (Lifecycle below).
        save_strategy="steps" if settings.CHECKPOINT_EVERY_STEPS else "no",
        save_steps=settings.CHECKPOINT_EVERY_STEPS or 500,
        save_total_limit=None,
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        # W&B and MLflow through transformers' own callbacks, their runs named RUN_ID; TensorBoard is train.tensorboard.
        report_to=[name for name in settings.REPORT_TO if name in ("wandb", "mlflow")] or "none",
        run_name=run.id,
        ddp_find_unused_parameters=False,
        # TRL labels and truncates unpacked rows at the start of training, in Python, about 100 us a row. Cached
        # beside the tokens, once per run. (unsloth does it in one process whatever this says.)
        dataset_num_proc=data.workers(rows, most=data.PACKING_WORKERS),
    )


def train(
    settings, run: Run, plan, model, tokenizer, train_ds, eval_ds, resume: Path | None, uploader, lease
) -> Metrics:
    """Trains (from the checkpoint `resume` when given), committing checkpoints through uploader (rank 0);
    saves the adapter and tokenizer to the stage's adapter/ and writes its train_log.jsonl. Stops early,
    with a checkpoint, on SIGTERM (Metrics.stopped_early); raises 75 when the lease is lost (lifecycle)."""
    import torch
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    if run.device.cuda:
        torch.cuda.reset_peak_memory_stats()
    step_log = step_logger(run.stage / TRAIN_LOG, run.device.rank_zero, resume)
    board = tensorboard(run, resume) if "tensorboard" in settings.REPORT_TO and run.device.rank_zero else None
    if run.device.rank_zero:
        continue_tracking(settings, run)
    stop = lifecycle(run, uploader, lease, step_log, board)
    # TRL turns a mixture of experts' router logits on for its load-balancing loss (SFTTrainer.__init__); generate()
    # then fails on gpt-oss (the loss's mask is the whole text, the logits the new tokens'): put back after training,
    # for the samples and the exported model's config.json.
    text_config = model.config.get_text_config()
    router_logits = getattr(text_config, "output_router_logits", None)
    packing, rows = data.is_packed(train_ds), data.row_count(train_ds)
    flex = run.backend == "unsloth" and kernels.compiles_per_length(model)
    if flex:
        kernels.sort_block_masks_in_aten()
    one_length = packing and flex
    if one_length and run.device.rank_zero:
        log.info("packed batches padded to %d tokens: unsloth trains %s on flex attention, compiled for each "
                 "batch length", plan.micro_batch * settings.MAX_SEQ_LENGTH, model.config.model_type)  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=sft_config(settings, run, plan, eval_ds is not None, rows, one_length, packing),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[step_log, stop] + ([board] if board else []),
    )
    if packing and not trainer.padding_free:  # unsloth turns it off for some models (its PADDING_FREE_BLOCKLIST)
        raise ConfigInvalid(f"PACKING=true: {run.backend} trains {model.config.model_type} without padding-free "
                            "batches, so packed rows would attend to each other: set PACKING=false")  # fmt: skip
    # step_log prints progress itself: as log lines in JSON mode, as one tqdm bar in text mode.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    attention = kernels.attention(run.backend, trainer.padding_free, trainer.model)
    if run.device.rank_zero:
        kernels.announce(attention)
    with preemption.deferred():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    stopped = stop.stopped
    evals = [row for row in step_log.rows if "eval_loss" in row]
    if not stopped and eval_ds is not None and (not evals or evals[-1]["step"] != trainer.state.global_step):
        evals.append(trainer.evaluate())  # logged to train_log.jsonl by step_log
    if router_logits is not None:
        text_config.output_router_logits = router_logits
    if run.device.rank_zero and not stopped:
        trainer.model.save_pretrained(run.stage / ADAPTER)
        tokenizer.save_pretrained(run.stage / ADAPTER)
    train_losses = [row["loss"] for row in step_log.rows if "loss" in row]
    tokens = int(trainer.state.num_input_tokens_seen)
    runtime = result.metrics["train_runtime"]
    trained_tokens = tokens - step_log.tokens_before
    epochs = trainer.state.epoch or 0
    return Metrics(
        steps=trainer.state.global_step,
        epochs=round(epochs, 4),
        train_loss=result.training_loss,
        first_loss=train_losses[0] if train_losses else None,
        final_loss=train_losses[-1] if train_losses else None,
        eval_loss=evals[-1]["eval_loss"] if evals else None,
        rows=round(epochs * rows),
        tokens=tokens,
        tokens_per_second=round(trained_tokens / runtime, 1) if runtime else None,
        train_seconds=round(runtime, 3),
        seconds_to_first_step=step_log.first_step_seconds,
        packing=packing_mode(trainer),
        attention=attention,
        micro_batch=plan.micro_batch,
        grad_accum=plan.grad_accum,
        activation_checkpointing=plan.checkpointing,
        estimated_peak_gpu_memory_gib=plan.estimate_gib,
        peak_gpu_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if run.device.cuda else None,
        peak_host_memory_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        checkpoint_stall_seconds=stop.stalls,
        stopped_early=stopped,
    )


def packing_mode(trainer) -> str:
    """How rows became sequences, as the trainer decided: PACKING=true is TRL's best-fit-decreasing bins of up to
    MAX_SEQ_LENGTH tokens, flattened without padding (position_ids restart per row and keep rows apart in
    attention); without packing, unsloth goes padding-free by itself on most GPUs (H100, H200)."""
    return f"{'bfd' if trainer.args.packing else 'off'}, {'padding-free' if trainer.padding_free else 'padded'}"


def tensorboard(run: Run, resume: Path | None):
    """transformers' TensorBoard callback writing to the stage's tensorboard/ (published with the run), which
    starts from the event files that the resumed checkpoint carries."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if resume is not None and (resume / TENSORBOARD).is_dir():
        shutil.copytree(resume / TENSORBOARD, run.stage / TENSORBOARD, dirs_exist_ok=True)
    return TensorBoardCallback(SummaryWriter(log_dir=str(run.stage / TENSORBOARD)))


def continue_tracking(settings, run: Run) -> None:
    """Points W&B and MLflow at the run named RUN_ID, so that every attempt (a replacement pod) logs into one run:
    W&B by its run id, MLflow by finding the run of that name in the experiment. Their own variables win."""
    if "wandb" in settings.REPORT_TO:
        os.environ.setdefault("WANDB_RUN_ID", run.id)
        os.environ.setdefault("WANDB_RESUME", "allow")
        os.environ.setdefault("WANDB_DIR", str(run.scratch))  # not the working directory: the image's is read-only
        if os.environ.get("WANDB_MODE", "online").strip().lower() not in ("offline", "disabled", "dryrun"):
            wandb_login()
    if "mlflow" in settings.REPORT_TO and "MLFLOW_RUN_ID" not in os.environ:
        import mlflow

        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "Default")
        try:
            found = mlflow.search_runs(experiment_names=[experiment], filter_string=f"attributes.run_name = '{run.id}'",
                                       max_results=1, output_format="list")  # fmt: skip
        except Exception as exc:  # before the first step: the tracking server is away or refuses these credentials
            problem = redact(first_line(exc))
            where = f"REPORT_TO=mlflow: MLFLOW_TRACKING_URI={redact(mlflow.get_tracking_uri())}"
            if re.search(r"\b(401|403|UNAUTHENTICATED|PERMISSION_DENIED)\b", problem):
                raise AccessDenied(f"{where} refused access ({problem}): check MLFLOW_TRACKING_TOKEN or "
                                   "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None  # fmt: skip
            raise TemporaryFailure(f"{where} cannot be reached ({problem}): check the server and the address, "
                                   "or leave mlflow out of REPORT_TO") from None  # fmt: skip
        if found:
            os.environ["MLFLOW_RUN_ID"] = found[0].info.run_id


def wandb_login() -> None:
    """Before the first step: W&B's server must take WANDB_API_KEY (exit 77; 75 when it does not answer, 78 when
    no key is set), instead of the first step failing as an unexpected error."""
    import wandb

    where = f"REPORT_TO=wandb: WANDB_BASE_URL={redact(os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai'))}"
    try:
        if not wandb.login(verify=True, prompt=False):
            raise ConfigInvalid(f"{where}: no API key: set WANDB_API_KEY (k8s/secret.example.yaml), "
                                "or WANDB_MODE=offline to log to files only")  # fmt: skip
    except wandb.errors.AuthenticationError as exc:
        problem = redact(first_line(exc))
        if "Failed to execute API request" in problem:  # wandb's words when no answer came in WANDB_HTTP_TIMEOUT
            raise TemporaryFailure(f"{where} did not answer ({problem}): check the server and the address, or "
                                   "set WANDB_MODE=offline") from None  # fmt: skip
        raise AccessDenied(f"{where} refused WANDB_API_KEY ({problem}): check the key") from None


def lifecycle(run: Run, uploader, lease, step_log, board=None):
    """A TrainerCallback that stops every rank at the same step boundary: with a checkpoint when SIGTERM arrived,
    with 75 when this attempt no longer holds the run (its lease) or two checkpoints in a row failed to commit. It
    hands each saved checkpoint with the step log (and TensorBoard events) so far to the uploader (rank 0), with
    every rank's RNG state (other nodes write theirs to their own disk), and times how long each save held
    training up and each step took (from the end of the step or save before), which a SIGTERM may wait for."""
    from transformers import TrainerCallback

    class Lifecycle(TrainerCallback):
        def __init__(self):
            self.stopped, self.stalls, self.save_started = False, [], None
            self.steps, self.since = [], time.perf_counter()

        def longest_step(self) -> float:
            """The longest step of this attempt but its first (compilation, allocator warm-up), when there is one."""
            return max(self.steps[1:] or self.steps or [0.0])

        def on_train_begin(self, args, state, control, **kwargs):
            self.since = time.perf_counter()

        def fault(self) -> Exception | None:
            refusal = lease.refusal() if lease is not None else None
            return refusal or (uploader.broken if uploader is not None else None)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.steps.append(now - self.since)
            self.since = now
            fault = self.fault()
            # 2: stop with an error, 1: stop with a checkpoint; every rank takes the highest.
            stop = distributed.most(run.device, 2 if fault else 1 if preemption.requested() else 0)
            if stop == 2:  # the checkpoints on scratch, committed or waiting, serve no one now
                if run.device.local_zero:
                    shutil.rmtree(run.checkpoints, ignore_errors=True)
                raise fault or TemporaryFailure(f"rank 0 stopped training at step {state.global_step}")
            if stop == 1:
                control.should_save = control.should_training_stop = self.stopped = True
            self.save_started = time.perf_counter() if control.should_save else None

        def on_save(self, args, state, control, **kwargs):
            stall = 0.0
            if self.save_started is not None:
                stall = round(time.perf_counter() - self.save_started, 3)
                self.stalls.append(stall)
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            states = distributed.gather_files(run.device, sorted(folder.glob("rng_state*.pth")))
            if run.device.local_zero and not run.device.rank_zero:  # rank 0 uploads its copy, with this node's RNG
                shutil.rmtree(folder, ignore_errors=True)
            if run.device.rank_zero and uploader is not None:
                for name, content in states.items():
                    if not (folder / name).is_file():
                        (folder / name).write_bytes(content)
                shutil.copyfile(step_log.path, folder / TRAIN_LOG)
                if board is not None and board.tb_writer is not None:  # the events so far, for the next attempt
                    board.tb_writer.flush()
                    shutil.copytree(run.stage / TENSORBOARD, folder / TENSORBOARD, dirs_exist_ok=True)
                uploader.submit(folder, state.global_step, self.longest_step(), stall)
            self.since = time.perf_counter()  # the next step starts after the save

    return Lifecycle()


def step_logger(path: Path, main: bool, resumed: Path | None, wait: float = FIRST_STEP_WAIT):
    """A TrainerCallback that writes train_log.jsonl and logs each step with loss, learning rate,
    tokens/s and ETA (as JSON fields in JSON mode); under torchrun, on rank 0 only. A resumed run starts
    from the log its checkpoint carries. When no step has ended `wait` seconds after training began, it says
    where the main thread is (once)."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.path, self.rows, self.first_step_seconds = path, [], None
            self.watch = threading.Timer(wait, self.stalled, (threading.current_thread().ident,))
            self.watch.daemon = True
            self.start, self.steps_before, self.tokens_before = time.perf_counter(), 0, 0
            if resumed is not None and (resumed / TRAIN_LOG).is_file():
                step = int(resumed.name.rsplit("-", 1)[1])
                rows = [json.loads(line) for line in (resumed / TRAIN_LOG).read_text().splitlines()]
                self.rows = [row for row in rows if row["step"] <= step]
            if main:
                path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

        def write(self, row: dict) -> None:
            self.rows.append(row)
            if main:
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")

        def stalled(self, thread: int) -> None:
            log.warning("no training step has ended %g s after training began; the main thread is at %s", wait,
                        where(thread))  # fmt: skip

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            if main:
                self.watch.start()
            self.steps_before, self.tokens_before = state.global_step, int(state.num_input_tokens_seen)
            self.bar = logs.progress(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                disable=not main or logs.is_json(),
            )  # fmt: skip

        def on_step_end(self, args, state, control, **kwargs):
            if self.first_step_seconds is None:
                self.first_step_seconds = round(time.time() - logs.STARTED, 3)
                self.watch.cancel()
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.watch.cancel()
            self.bar.close()

        def on_log(self, args, state, control, **kwargs):
            values = {k: v for k, v in kwargs.get("logs", {}).items() if isinstance(v, int | float)}
            loss = values.get("loss", values.get("eval_loss"))
            if loss is None:
                return  # the trainer's end-of-run summary; train() reports it
            elapsed = time.perf_counter() - self.start
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **values}
            row |= {
                "tokens": int(state.num_input_tokens_seen),
                "seconds": round(elapsed, 3),
                "time": round(time.time(), 3),
            }
            row["tokens_per_second"] = round((row["tokens"] - self.tokens_before) / elapsed, 1) if elapsed else None
            remaining = state.max_steps - state.global_step
            row["eta_seconds"] = round(elapsed / max(state.global_step - self.steps_before, 1) * remaining, 1)
            self.write(row)
            if not main:
                return
            if not logs.is_json():  # the bar shows the train loss; a line every twentieth of the run, and the last
                if "loss" in values:
                    self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                every = max(1, state.max_steps // 20)
                if "loss" in values and state.global_step % every and state.global_step != state.max_steps:
                    return
            log.info(
                "step %d/%d %s %.4f, lr %.3g, %s tokens/s, eta %ss",
                state.global_step, state.max_steps, "loss" if "loss" in values else "eval loss", loss,
                values.get("learning_rate", 0), row["tokens_per_second"], row["eta_seconds"], extra={"fields": row},
            )  # fmt: skip

    return StepLog()


def where(thread: int, most: int = 8) -> str:
    """A thread's stack, innermost first: the frame it is in, then the frame through which it entered each package
    (the outermost of a run of one package's frames; the standard library's are left out), at most `most` of them:
    what a stalled step waits on, e.g. "triton compiler.py:324 compile <- torch flex_attention.py:1271 ..."."""
    frames: list[tuple[str, str]] = []  # (package, place), innermost first
    frame = sys._current_frames().get(thread)
    while frame is not None:
        package = str(frame.f_globals.get("__name__", "?")).split(".")[0]
        if package not in sys.stdlib_module_names:
            code = frame.f_code
            frames.append((package, f"{package} {Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"))
        frame = frame.f_back
    shown = [place for i, (package, place) in enumerate(frames)
             if i == 0 or i + 1 == len(frames) or frames[i + 1][0] != package]  # fmt: skip
    return " <- ".join(shown[:most] + (["..."] if len(shown) > most else [])) or "no Python frame"
