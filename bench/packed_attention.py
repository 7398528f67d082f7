"""Where a packed step's time goes: attention over one packed micro-batch of short rows, three ways, on a GPU.

    python bench/packed_attention.py [--tokens 16384] [--median 150]

One SDPA call per row (unsloth's path when it has no xformers, flash-attn or torch varlen kernel with enable_gqa),
one torch varlen call over the whole row (K/V expanded for GQA), and the same tokens as full rows of 2,048 in one
batched call. Llama-3-8B's attention shape: 32 heads, 8 KV heads, head size 128; forward and backward per layer.
"""

import argparse
import inspect
import math
import random
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn

HEADS, KV_HEADS, HEAD_DIM, LAYERS, FULL = 32, 8, 128, 32, 2048


def lengths(tokens: int, median: float) -> list[int]:
    random.seed(0)
    rows = []
    while sum(rows) < tokens:
        rows.append(max(8, min(FULL, int(random.lognormvariate(math.log(median), 0.8)))))
    rows[-1] -= sum(rows) - tokens
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--median", type=float, default=150)
    args = parser.parse_args()
    rows = lengths(args.tokens, args.median)
    bounds = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(1, h, args.tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (HEADS, KV_HEADS, KV_HEADS))  # fmt: skip
    causal = (
        {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters else {"is_causal": True}
    )

    def per_row():
        outs, start = [], 0
        for n in rows:
            part = (x[:, :, start : start + n] for x in (q, k, v))
            outs.append(F.scaled_dot_product_attention(*part, is_causal=True, enable_gqa=True))
            start += n
        return torch.cat(outs, dim=2)

    def varlen():
        flat = (x[0].repeat_interleave(HEADS // x.shape[1], dim=0).transpose(0, 1).contiguous() for x in (q, k, v))
        return varlen_attn(*flat, bounds, bounds, max(rows), max(rows), **causal)

    def full_rows():
        split = (x.view(x.shape[1], -1, FULL, HEAD_DIM).transpose(0, 1) for x in (q, k, v))
        return F.scaled_dot_product_attention(*split, is_causal=True, enable_gqa=True)

    print(f"{args.tokens} tokens in {len(rows)} rows (median {sorted(rows)[len(rows) // 2]}), fwd+bwd per layer:")
    for name, attend in [("one SDPA per row", per_row), ("one varlen call", varlen), ("full rows", full_rows)]:
        for repeat in (3, 10):  # warm-up, then timed
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeat):
                attend().sum().backward()
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 10 * 1000
        print(f"  {name}: {ms:.2f} ms, {ms * LAYERS / 1000:.3f} s for {LAYERS} layers")


if __name__ == "__main__":
    main()
