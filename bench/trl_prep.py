"""TRL's preparation of the job's tokenized rows at the start of training (labels, then best-fit packing into
MAX_SEQ_LENGTH rows): the SFTTrainer the job builds (job.train.sft_config), timed with the job's worker count and
with one process, on CPU; prints a markdown table for docs/benchmarks.md.

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
    print("| workers | seconds | rows/s | packed rows |\n|---|---|---|---|")
    for rows_given in (args.rows, 0):  # the job's count, then one process
        tokens = load_from_disk(args.work / "tokens")
        tokens.cleanup_cache_files()  # each run starts from the tokens alone
        config = train.sft_config(settings, run, memory.plan(settings, device, "hf", None, 0), False, rows_given)
        start = time.perf_counter()
        trainer = SFTTrainer(model=lm, args=config, train_dataset=tokens, processing_class=tokenizer)
        seconds = time.perf_counter() - start
        print(f"| {config.dataset_num_proc or 1} | {seconds:.1f} | {args.rows / seconds:,.0f} | "
              f"{len(trainer.train_dataset):,} |")  # fmt: skip


if __name__ == "__main__":
    main()
