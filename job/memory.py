"""GPU memory: the training peak estimated from the model's configuration (no weights loaded), and the
micro-batch, accumulation and activation checkpointing that use the GPU while keeping the effective batch.

The estimate is weights + LoRA state + tokens x (activations + LM head), with two constants per backend fitted
to peaks measured on an H200 (docs/benchmarks.md, "real data"); `make bench` prints it beside each measured peak.
"""

import logging
from dataclasses import asdict, dataclass

from job import distributed
from job.errors import GpuOutOfMemory

log = logging.getLogger(__name__)

GIB = 2**30
# Bytes a token keeps per element of a layer's linear widths (the sum of in and out features over its linear
# layers), in a layer whose activations are stored; and bytes a token keeps per vocabulary entry for the LM head
# and loss. Fitted per backend to the measured peaks (docs/benchmarks.md, "real data").
ACTIVATION = {"unsloth": 1.46, "hf": 2.73}
HEAD = {"unsloth": 0.19, "hf": 0.19}
# The CUDA context's workspace, the allocator's rounding and kernels' scratch.
OVERHEAD = int(0.5 * GIB)
# Bytes per LoRA parameter for the optimizer's state (the weights and gradients are fp32: 8 more).
OPTIMIZER_BYTES = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_torch": 8, "adamw_torch_fused": 8,
                   "adafactor": 4, "sgd": 0}  # fmt: skip
# A plan uses at most this share of the free memory: the estimate is within 15% of the measured peaks.
FILL = 0.85


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model's configuration, counted on the meta device."""

    linear: int  # parameters of the layers' linear modules: 4-bit under LOAD_IN_4BIT
    other: int  # embeddings, LM head, norms: 16-bit
    lora: int  # LoRA parameters at LORA_R on LORA_TARGET_MODULES
    layers: int
    hidden: int
    width: int  # one layer's linear widths (in + out features, summed)
    vocab: int


@dataclass(frozen=True)
class Plan:
    """How each optimizer step is split on this GPU, and why."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    estimate_gib: float | None
    free_gib: float | None
    reason: str

    def fields(self) -> dict:
        return asdict(self)


def shape(config, settings) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    linear = sum(m.weight.numel() for _, m in linears)
    targets = set(settings.LORA_TARGET_MODULES)
    layers = config.num_hidden_layers
    return Shape(
        linear=linear,
        other=sum(p.numel() for p in model.parameters()) - linear,
        lora=sum(
            settings.LORA_R * (m.in_features + m.out_features) for n, m in linears if n.rsplit(".", 1)[-1] in targets
        ),
        layers=layers,
        hidden=config.hidden_size,
        width=sum(m.in_features + m.out_features for _, m in linears) // layers,
        vocab=config.vocab_size,
    )


def estimate(shape: Shape, settings, backend: str, tokens: int, checkpointing: bool) -> int:
    """Peak bytes of training with `tokens` tokens per micro-batch."""
    weights = shape.linear * (0.53 if settings.LOAD_IN_4BIT else 2) + shape.other * 2  # NF4 + double-quant scales
    lora = shape.lora * (8 + OPTIMIZER_BYTES[settings.OPTIMIZER])
    stored = 1 if checkpointing else shape.layers  # layers whose activations are held at once
    per_token = stored * shape.width * ACTIVATION[backend] + shape.vocab * HEAD[backend]
    if checkpointing and backend == "hf":  # the trainer's checkpointing keeps each layer's input on the GPU
        per_token += shape.layers * shape.hidden * 2
    return int(weights + lora + tokens * per_token + OVERHEAD)


def plan(settings, device, backend: str, config, row_tokens: int) -> Plan:
    """The micro-batch, accumulation and checkpointing for this process's GPU (as given without one, or without
    the model's configuration). row_tokens: the longest sequence a micro-batch holds per row (MAX_SEQ_LENGTH when
    packing). GpuOutOfMemory when nothing fits."""
    given = (settings.PER_DEVICE_BATCH_SIZE, settings.GRAD_ACCUM_STEPS)
    if not device.cuda:
        return Plan(*given, False, None, None, "no GPU: as given")
    if config is None:
        return Plan(*given, True, None, None, "BASE_MODEL's configuration is unreadable: as given, checkpointing on")
    import torch

    # Every rank plans with the least free memory of any: one plan for all, or DDP hangs.
    free = distributed.least(device, torch.cuda.mem_get_info(device.local_rank)[0])
    gpu = f"GPU {device.local_rank}" if device.world_size == 1 else "the fullest GPU"
    return choose(settings, backend, shape(config, settings), row_tokens, free, gpu)


def choose(settings, backend: str, sizes: Shape, row_tokens: int, free: int, gpu: str = "the GPU") -> Plan:
    """With AUTO_BATCH, the fastest split of the step's sequences that fits: checkpointing off first (it costs
    about a third of a step), then the widest micro-batch. Without, the given split if it fits at all."""
    given = (settings.PER_DEVICE_BATCH_SIZE, settings.GRAD_ACCUM_STEPS)
    batch = given[0] * given[1]
    if settings.AUTO_BATCH:
        options = [(m, ckpt) for ckpt in (False, True) for m in range(batch, 0, -1) if batch % m == 0]
    else:
        options = [(given[0], True)]
    for micro, ckpt in options:
        need = estimate(sizes, settings, backend, micro * row_tokens, ckpt)
        if need <= FILL * free:
            why = (f"the fastest split of {batch} sequences that fits {FILL:.0%} of the free memory"
                   if settings.AUTO_BATCH else "as given (AUTO_BATCH=false)")  # fmt: skip
            return Plan(micro, batch // micro, ckpt, round(need / GIB, 2), round(free / GIB, 2), why)
    if need <= free:  # the leanest (or the given) split, with less room than the estimate's error
        log.warning("training needs about %.1f GiB of the %.1f GiB free on %s: it may run out of memory",
                    need / GIB, free / GIB, gpu)  # fmt: skip
        return Plan(micro, batch // micro, ckpt, round(need / GIB, 2), round(free / GIB, 2), "the leanest split; tight")
    raise GpuOutOfMemory(
        f"training needs about {need / GIB:.1f} GiB (estimated before loading: {micro} sequence(s) of {row_tokens} "
        f"tokens per micro-batch, activation checkpointing on) and {gpu} has {free / GIB:.1f} GiB free: lower "
        f"MAX_SEQ_LENGTH (now {settings.MAX_SEQ_LENGTH})"
        + (
            f", or PER_DEVICE_BATCH_SIZE (now {given[0]}) and raise GRAD_ACCUM_STEPS (now {given[1]}) to keep the "
            "batch, or set AUTO_BATCH=true"
            if not settings.AUTO_BATCH
            else ""
        )
        + f", lower LORA_R (now {settings.LORA_R})"
        + ("" if settings.LOAD_IN_4BIT else ", set LOAD_IN_4BIT=true")
        + ", or use a GPU with more free memory"
    )
