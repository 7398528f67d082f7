"""The preparation of the job's tokenized rows for training (labels, then best-fit packing into MAX_SEQ_LENGTH rows):
the job's own (data.pack) with its worker count and in one process, against TRL's preparation inside the SFTTrainer
(the job's before 2026-12-05; unsloth's replacement of it runs in one process), on CPU; prints a markdown table for
docs/benchmarks.md.

    python bench/trl_prep.py [--rows 200000] [--work /tmp/bench-trl-prep]

Rows: token ids with about the lengths of bench/real_data.py's Alpaca-like mix under a Llama 3 tokenizer (a median
of about 250 tokens, a long tail), a third of each row's tokens a prompt outside the loss.
"""

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-trl-prep"))
    args = parser.parse_args()

    from datasets import Dataset, disable_progress_bars, load_from_disk
    from trl import SFTTrainer

    from bench.synthetic_model import build
    from job import data, memory, model, train
    from job.context import Device, Run
    from job.settings import Settings

    disable_progress_bars()
    shutil.rmtree(args.work, ignore_errors=True)
    build("tiny", args.work / "model")
    settings = Settings(
        DATASET_URI="x", OUTPUT_URI="y", BASE_MODEL=str(args.work / "model"), PACKING=True, SCRATCH_DIR=str(args.work),
        TRAIN_BACKEND="hf", LOAD_IN_4BIT=False, OPTIMIZER="adamw_torch",
    )  # fmt: skip
    device = Device.detect(settings)
    run = Run.build(settings, "trl-prep", device, "hf")
    base = model.Base(settings.BASE_MODEL)
    tokenizer = model.load_tokenizer(settings, base, [])
    lm = model.load(settings, device, base, tokenizer, "hf")
    rng = random.Random(0)
    lengths = [min(4096, 16 + round(rng.lognormvariate(5.5, 0.7))) for _ in range(args.rows)]

    def rows():
        for n, k in enumerate(lengths):
            cut = k // 3  # the prompt: outside the loss
            yield {"input_ids": [(n + i) % 1000 for i in range(k)], "assistant_masks": [0] * cut + [1] * (k - cut)}

    Dataset.from_generator(rows, cache_dir=str(args.work / "cache")).save_to_disk(args.work / "tokens")
    print(f"{args.rows:,} rows, {sum(lengths):,} tokens, {os.cpu_count()} CPUs, cores() {data.cores()}")
    print("| preparation | workers | seconds | rows/s | packed rows |\n|---|---|---|---|---|")
    for most in (data.PACKING_WORKERS, 1):  # the job's count, then one process
        data.PACKING_WORKERS = most
        tokens = load_from_disk(args.work / "tokens")
        start = time.perf_counter()
        packed = data.pack(tokens, settings.MAX_SEQ_LENGTH, args.work / f"packed-{most}" / "train.arrow")
        seconds = time.perf_counter() - start
        count = data.workers(args.rows, most, data.PACKING_ROWS_PER_WORKER) or 1
        print(f"| the job's (data.pack) | {count} | {seconds:.1f} | {args.rows / seconds:,.0f} | {len(packed):,} |")
    tokens = load_from_disk(args.work / "tokens")
    config = train.sft_config(settings, run, memory.plan(settings, device, "hf", None, 0), False)
    config.packing, config.dataset_num_proc = True, None  # TRL's own preparation, in one process (as unsloth runs it)
    start = time.perf_counter()
    trainer = SFTTrainer(model=lm, args=config, train_dataset=tokens, processing_class=tokenizer)
    seconds = time.perf_counter() - start
    print(f"| TRL's (SFTTrainer) | 1 | {seconds:.1f} | {args.rows / seconds:,.0f} | {len(trainer.train_dataset):,} |")


if __name__ == "__main__":
    main()
