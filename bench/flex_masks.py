"""Gemma 3's two flex-attention masks (full and sliding-window) for packed batches, built as transformers builds them
in training, three ways, each in a process of its own with empty compile caches:

  compiled   torch's create_block_mask compiled, as transformers 5.17 asks (on torch 2.11 its argsort becomes a
             Triton sort that ptxas takes minutes over: pytorch/pytorch#182060)
  aten-sort  the same with the job's kernels.sort_block_masks_in_aten (what train() installs for Gemma 3)
  eager      not compiled: the whole tokens x tokens mask is built each batch

Prints one JSON line a way: seconds to the first batch's masks (compiling included), seconds for each of three more
packings, and the device's peak memory; a way that outlasts --timeout is stopped and says so.

    python3 bench/flex_masks.py [--tokens 16384] [--timeout 120] [--ways compiled,aten-sort,eager]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = ("compiled", "aten-sort", "eager")


def packed_positions(tokens: int, seed: int):
    """position_ids of rows of 100 to 600 tokens packed into one sequence (TRL's padding-free collator's)."""
    import torch

    generator, positions = torch.Generator().manual_seed(seed), []
    while len(positions) < tokens:
        positions.extend(range(int(torch.randint(100, 600, (1,), generator=generator))))
    return torch.tensor(positions[:tokens])[None]


def build(way: str, tokens: int) -> dict:
    import torch
    from transformers import Gemma3TextConfig
    from transformers import masking_utils as masks

    from job import kernels

    if way == "aten-sort":
        kernels.sort_block_masks_in_aten()
    elif way == "eager":
        compiled = masks.create_block_mask
        masks.create_block_mask = torch.compiler.disable(lambda *a, **k: compiled(*a, **(k | {"_compile": False})))
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=512,
                              max_position_embeddings=2 * tokens)  # fmt: skip
    config._attn_implementation = "flex_attention"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    embeddings = torch.zeros(1, tokens, 64, device=device, dtype=torch.bfloat16)
    seconds = []
    for seed in range(4):
        inputs = {"config": config, "inputs_embeds": embeddings, "attention_mask": None, "past_key_values": None,
                  "position_ids": packed_positions(tokens, seed).to(device)}  # fmt: skip
        start = time.perf_counter()
        full, sliding = masks.create_causal_mask(**inputs), masks.create_sliding_window_causal_mask(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(round(time.perf_counter() - start, 3))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"way": way, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tokens": tokens,
            "first_seconds": seconds[0], "later_seconds": seconds[1:], "peak_gib": peak and round(peak, 2),
            "sparsity_percent": [round(full.sparsity(), 1), round(sliding.sparsity(), 1)]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--way", help=argparse.SUPPRESS)  # one way, in this process
    args = parser.parse_args()
    if args.way:
        print(json.dumps(build(args.way, args.tokens)), flush=True)
        return 0
    failed = 0
    for way in args.ways.split(","):
        with tempfile.TemporaryDirectory() as caches:
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": caches, "TRITON_CACHE_DIR": f"{caches}/triton"}
            command = [sys.executable, __file__, "--way", way, "--tokens", str(args.tokens)]
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(json.dumps({"way": way, "tokens": args.tokens, "first_seconds": None,
                                  "stopped_after_seconds": args.timeout}), flush=True)  # fmt: skip
                failed += 1
                continue
        if done.returncode:
            print(json.dumps({"way": way, "exit": done.returncode, "error": done.stderr[-2000:]}), flush=True)
            failed += 1
        else:
            print(done.stdout.strip().splitlines()[-1], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
