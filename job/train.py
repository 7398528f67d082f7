"""Training: TRL's SFTTrainer with the contract's hyperparameters, logging one line per step."""

import json
import logging
import resource
import time
from pathlib import Path

from job import logs

log = logging.getLogger(__name__)


def sft_config(settings, checkpoints: Path, backend: str, has_eval: bool):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available() and not settings.DRY_RUN
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=str(checkpoints),
        per_device_train_batch_size=settings.PER_DEVICE_BATCH_SIZE,
        per_device_eval_batch_size=settings.PER_DEVICE_BATCH_SIZE,
        gradient_accumulation_steps=settings.GRAD_ACCUM_STEPS,
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
        packing=settings.PACKING,
        # unsloth checkpoints activations itself (use_gradient_checkpointing="unsloth"); hf needs the trainer's.
        gradient_checkpointing=cuda and backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if has_eval else "no",
        eval_steps=0.2,  # a fraction: five evaluations over the run, whatever its length
        save_strategy="steps" if settings.CHECKPOINT_EVERY_STEPS else "no",
        save_steps=settings.CHECKPOINT_EVERY_STEPS or 500,
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        ddp_find_unused_parameters=False,
        dataset_num_proc=None,
    )


def train(settings, model, tokenizer, train_ds, eval_ds, out: Path, checkpoints: Path, backend: str) -> dict:
    """Trains, saves the adapter and tokenizer to out/adapter, writes out/train_log.jsonl; returns metrics."""
    import torch
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_log = step_logger(out / "train_log.jsonl", main=settings.RANK == 0)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(settings, checkpoints, backend, eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[step_log],
    )
    # step_log prints progress itself: as log lines in JSON mode, as one tqdm bar in text mode.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    result = trainer.train()
    evals = [row for row in step_log.rows if "eval_loss" in row]
    if eval_ds is not None and (not evals or evals[-1]["step"] != trainer.state.global_step):
        evals.append(trainer.evaluate())  # logged to train_log.jsonl by step_log
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
    train_losses = [row["loss"] for row in step_log.rows if "loss" in row]
    tokens = int(trainer.state.num_input_tokens_seen)
    runtime = result.metrics["train_runtime"]
    return {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 4),
        "train_loss": result.training_loss,
        "first_loss": train_losses[0] if train_losses else None,
        "final_loss": train_losses[-1] if train_losses else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens": tokens,
        "tokens_per_second": round(tokens / runtime, 1) if runtime else None,
        "train_seconds": round(runtime, 3),
        "seconds_to_first_step": step_log.first_step_seconds,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if torch.cuda.is_available()
        else None,
        "peak_host_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def step_logger(path: Path, main: bool):
    """A TrainerCallback that writes train_log.jsonl and logs each step with loss, learning rate,
    tokens/s and ETA (as JSON fields in JSON mode); under torchrun, on rank 0 only."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.rows, self.start, self.first_step_seconds = [], time.perf_counter(), None
            if main:
                path.write_text("")

        def write(self, row: dict) -> None:
            self.rows.append(row)
            if main:
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.bar = logs.progress(
                total=state.max_steps, desc="train", unit="step", disable=not main or logs.is_json()
            )

        def on_step_end(self, args, state, control, **kwargs):
            if self.first_step_seconds is None:
                self.first_step_seconds = round(time.perf_counter() - self.start, 3)
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
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
            row["tokens_per_second"] = round(row["tokens"] / elapsed, 1) if elapsed else None
            remaining = state.max_steps - state.global_step
            row["eta_seconds"] = round(elapsed / max(state.global_step, 1) * remaining, 1)
            self.write(row)
            if not main:
                return
            if not logs.is_json():
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                return
            log.info(
                "step %d/%d %s %.4f, %s tokens/s, eta %ss",
                state.global_step, state.max_steps, "loss" if "loss" in values else "eval loss", loss,
                row["tokens_per_second"], row["eta_seconds"], extra={"fields": row},
            )  # fmt: skip

    return StepLog()
