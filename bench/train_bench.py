"""One benchmark run: the job's own model and train stages (job.model.load, job.train.train) on a
synthetic model of a named shape and synthetic rows that fill every sequence; prints one JSON line.

    python bench/train_bench.py --shape llama-3-8b --backend unsloth [--steps 15 --seq 2048 --batch 4]
    torchrun --nproc-per-node 2 bench/train_bench.py --shape llama-3-8b --backend unsloth

Steps after the warm-up count; the median step gives tokens/s. MFU counts 4N FLOPs a token (forward and
input-gradient passes over N frozen parameters) against a bf16 matmul peak measured in the same process.
`make bench` runs the whole table (bench/run.py).
"""

import time

START = time.time()  # time to first step counts imports, loading and compilation: what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic_model import DEMO_DATA, build  # noqa: E402
from job import data, distributed, memory, model, train  # noqa: E402
from job.context import Device, Run  # noqa: E402
from job.settings import Settings  # noqa: E402

WARMUP = 3


def steady_spans(steps: list[dict]) -> list[tuple[float, float]]:
    """(seconds per step, tokens per second) between consecutive train_log rows after the warm-up (compilation,
    allocator). Rows can be more than one step apart, so seconds are divided by the steps between them."""
    return [
        (
            (b["seconds"] - a["seconds"]) / (b["step"] - a["step"]),
            (b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"]),
        )
        for a, b in zip(steps, steps[1:])
        if a["step"] >= WARMUP
    ]


def matmul_peak_tflops() -> float:
    """bf16 dense matmul throughput of this GPU, measured: the denominator of MFU."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start, runs = time.perf_counter(), 50
    for _ in range(runs):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * runs / (time.perf_counter() - start) / 1e12


def mfu(tokens_per_second: float, parameters: int, peak_tflops: float, gpus: int = 1) -> float:
    """Model FLOPs utilisation: 4N FLOPs a token (forward and input-gradient passes over N frozen parameters)."""
    return tokens_per_second * 4 * parameters / (peak_tflops * 1e12 * gpus)


def synthetic_rows(count: int, words: int, seed: int = 0) -> list[dict]:
    vocabulary = DEMO_DATA.read_text().split()
    rng = random.Random(seed)
    return [{"prompt": "", "completion": " ".join(rng.choices(vocabulary, k=words))} for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--backend", choices=["unsloth", "hf"], required=True)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--literal", action="store_true", help="AUTO_BATCH=false: checkpointing on, batch as given")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "bench-models")
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()  # without one (a smoke test of this script), 32-bit LoRA on the CPU
    path = args.models / args.shape
    settings = Settings(
        BASE_MODEL=str(path), DATASET_URI="synthetic", OUTPUT_URI="unused",
        TRAIN_BACKEND=args.backend, MAX_SEQ_LENGTH=args.seq, PER_DEVICE_BATCH_SIZE=args.batch, GRAD_ACCUM_STEPS=1,
        MAX_STEPS=args.steps, WARMUP_STEPS=1, CHECKPOINT_EVERY_STEPS=0, LOG_FORMAT="json", LOAD_IN_4BIT=gpu,
        OPTIMIZER="adamw_8bit" if gpu else "adamw_torch", AUTO_BATCH=not args.literal,
    )  # fmt: skip
    device = Device.detect(settings)
    distributed.setup(device)
    if device.local_zero and not path.is_dir():
        build(args.shape, path)
    distributed.barrier(device)
    backend = model.resolve_backend(settings, device)
    base = model.Base(settings.BASE_MODEL)
    tokenizer = model.load_tokenizer(settings, base, [])
    # Rows long enough to be cut at --seq tokens: every sequence is full, as in the measured stack.
    rows = synthetic_rows(args.steps * args.batch * settings.WORLD_SIZE + 8, words=args.seq * 2)
    dataset = data.tokenize(tokenizer, rows, responses_only=False)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.source)
    plan = memory.plan(settings, device, backend, config, args.seq)
    lm = model.load(settings, device, base, tokenizer, backend, plan.checkpointing)
    with tempfile.TemporaryDirectory() as scratch:
        run = Run.build(settings.model_copy(update={"SCRATCH_DIR": scratch}), "bench", device, backend)
        run.stage.mkdir(parents=True)
        metrics = train.train(settings, run, plan, lm, tokenizer, dataset, None, resume=None, uploader=None, lease=None)
        distributed.teardown(device)
        if not device.rank_zero:  # rank 0 alone writes the step log
            return 0
        log = [json.loads(line) for line in (run.stage / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    spans = steady_spans(steps)
    step_seconds = statistics.median(s for s, _ in spans)
    tokens_per_second = statistics.median(t for _, t in spans)
    peak = matmul_peak_tflops() if gpu else None
    parameters = model.parameter_count(config)
    result = {
        "shape": args.shape, "backend": backend, "gpus": settings.WORLD_SIZE, "seq": args.seq, "batch": args.batch,
        "steps_timed": len(spans), "seconds_per_step": round(step_seconds, 4),
        "tokens_per_second": round(tokens_per_second), "peak_gpu_gib": metrics.peak_gpu_memory_gib,
        "estimated_gib": plan.estimate_gib, "micro_batch": plan.micro_batch, "checkpointing": plan.checkpointing,
        "seconds_to_first_step": round(steps[0]["time"] - START, 1), "parameters": parameters,
        "mfu": round(mfu(tokens_per_second, parameters, peak, settings.WORLD_SIZE), 4) if peak else None,
        "matmul_peak_tflops": round(peak, 1) if peak else None,
        "gpu": torch.cuda.get_device_name() if peak else "cpu",
        "torch": torch.__version__, "final_loss": metrics.final_loss,
        "logged": [(r["step"], r["tokens"], round(r["loss"], 3), r["seconds"]) for r in steps],
    }  # fmt: skip
    print("BENCH " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
