"""GPU memory: the training peak estimated from the model's configuration (no weights loaded), and the
micro-batch, accumulation and activation checkpointing that use the GPU while keeping the effective batch.

The estimate is weights + LoRA state + tokens x (activations + LM head), with two constants per backend fitted
to peaks measured on an H200 (docs/benchmarks.md, "real data"); `make bench` prints it beside each measured peak,
and tests/memory_peaks.json keeps every measured case that tests/test_memory.py checks it against.
The same shape bounds LORA_R, with or without a GPU.
"""

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from job import distributed
from job.errors import ConfigInvalid, OutOfMemory
from job.model import lora_targets

log = logging.getLogger(__name__)

GIB = 2**30
# Bytes a token keeps per element of a layer's linear widths (the sum of in and out features over its linear
# layers), in a layer whose activations are stored; and bytes a token keeps per vocabulary entry for the LM head
# and loss. Fitted per backend to the measured peaks (docs/benchmarks.md, "real data").
ACTIVATION = {"unsloth": 1.46, "hf": 2.73}
HEAD = {"unsloth": 0.19, "hf": 0.19}
# Bytes a token keeps per element of a query or key norm's input (Qwen3 and Gemma 3 normalise each head's q_proj
# and k_proj output): a copy of that output beside the normalised one, which is not in the linear widths. unsloth's
# kernel keeps it in bf16 (unsloth/kernels/rms_layernorm.py saves X, W and the inverse RMS); transformers' RMSNorm
# keeps it upcast to fp32. Without this, Qwen3-8B's peak was 12% above the estimate (tests/memory_peaks.json).
QK_NORM = {"unsloth": 2, "hf": 4}
# The CUDA context's workspace, the allocator's rounding and kernels' scratch.
OVERHEAD = int(0.5 * GIB)
# Bytes per LoRA parameter for the optimizer's state (the weights and gradients are fp32: 8 more).
OPTIMIZER_BYTES = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "adamw_torch": 8, "adamw_torch_fused": 8,
                   "adafactor": 4, "sgd": 0}  # fmt: skip
# A plan uses at most this share of the free memory: the estimate is within 15% of the measured peaks.
FILL = 0.85
# cgroup v2's files for the container's memory: its limit ("max": none), its use, and the page cache in that use.
CGROUP = "/sys/fs/cgroup"
MEMINFO = "/proc/meminfo"


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model's configuration, counted on the meta device."""

    linear: int  # parameters of the layers' linear modules: 4-bit under LOAD_IN_4BIT
    other: int  # embeddings, LM head, norms: 16-bit
    lora: int  # LoRA parameters at LORA_R on LORA_TARGET_MODULES
    narrowest: int  # the least in or out features of a LORA_TARGET_MODULES layer; 0 when none is in the model
    layers: int
    hidden: int
    width: int  # one layer's linear widths (in + out features, summed), and LORA_R for each adapted one
    vocab: int
    qk_normed: int  # one layer's projection outputs that a norm takes as input (Qwen3's q_norm and k_norm)


@dataclass(frozen=True)
class Plan:
    """How each optimizer step is split on this GPU, and why."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    estimate_gib: float | None
    free_gib: float | None
    reason: str
    host_gib: float | None = None  # host memory of unsloth's offloaded checkpoints (offload)

    def fields(self) -> dict:
        return asdict(self)


def shape(config, settings) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    linears = [(n, m) for n, m in modules.items() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    linear = sum(m.weight.numel() for _, m in linears)
    targets = set(lora_targets(settings, {n.rsplit(".", 1)[-1] for n, _ in linears}))
    adapted = [m for n, m in linears if n.rsplit(".", 1)[-1] in targets]
    text = config.get_text_config()  # the language model's part of a multimodal configuration (Gemma 3, Llama 4)
    layers = text.num_hidden_layers
    return Shape(
        linear=linear,
        other=sum(p.numel() for p in model.parameters()) - linear,
        lora=sum(settings.LORA_R * (m.in_features + m.out_features) for m in adapted),
        narrowest=min((min(m.in_features, m.out_features) for m in adapted), default=0),
        layers=layers,
        hidden=text.hidden_size,
        # An adapted layer also keeps its input times A (LORA_R values a token) for B's gradient.
        width=(sum(m.in_features + m.out_features for _, m in linears) + settings.LORA_R * len(adapted)) // layers,
        vocab=text.vocab_size,
        # A norm named after a projection (q_norm beside q_proj) takes that projection's output as its input.
        qk_normed=sum(m.out_features for n, m in linears if n.removesuffix("_proj") + "_norm" in modules) // layers,
    )


def check_rank(settings, sizes: Shape, config) -> None:
    """ConfigInvalid when LORA_R is above the narrowest adapted layer's width: B x A then has rank at most that
    width, so a larger LORA_R adds parameters, memory and time but no capacity (LORA_R=65536 ran 6 minutes a step
    on a 64-wide dry-run model)."""
    if 0 < sizes.narrowest < settings.LORA_R:
        # A configuration read from BASE_MODEL has its name; the dry run's stand-in for an unreadable one has none.
        whose = "BASE_MODEL's" if config.name_or_path else f"the stand-in {type(config).__name__}'s"
        raise ConfigInvalid(
            f"LORA_R={settings.LORA_R} is above {sizes.narrowest}, the narrowest width (in or out features) of "
            f"{whose} LORA_TARGET_MODULES layers: a rank above a layer's width adds memory but nothing it can learn; "
            f"set LORA_R to {sizes.narrowest} or less"
        )


def estimate(shape: Shape, settings, backend: str, tokens: int, checkpointing: bool) -> int:
    """Peak bytes of training with `tokens` tokens per micro-batch."""
    weights = shape.linear * (0.53 if settings.LOAD_IN_4BIT else 2) + shape.other * 2  # NF4 + double-quant scales
    lora = shape.lora * (8 + OPTIMIZER_BYTES[settings.OPTIMIZER])
    stored = 1 if checkpointing else shape.layers  # layers whose activations are held at once
    per_token = stored * (shape.width * ACTIVATION[backend] + shape.qk_normed * QK_NORM[backend])
    per_token += shape.vocab * HEAD[backend]
    if checkpointing and backend == "hf":  # the trainer's checkpointing keeps each layer's input on the GPU
        per_token += shape.layers * shape.hidden * 2
    return int(weights + lora + tokens * per_token + OVERHEAD)


def offload(shape: Shape, backend: str, tokens: int, checkpointing: bool) -> int:
    """Host bytes of unsloth's checkpointing with `tokens` tokens per micro-batch: it copies every checkpointed
    layer's input but the last to pinned host memory in the forward pass and back in the backward
    (unsloth_zoo/gradient_checkpointing.py, UnslothCheckpointFunction): Llama-3-8B at 8 x 32,768 tokens pins 62 GiB."""
    if backend != "unsloth" or not checkpointing:
        return 0
    return (shape.layers - 1) * tokens * shape.hidden * 2


def host_free() -> int | None:
    """Host memory this process may still take: its container's limit less what it uses but the page cache (which
    the kernel reclaims), within the node's MemAvailable; shared by the processes of a node (torchrun's
    LOCAL_WORLD_SIZE). None where neither can be read."""
    free = []
    try:
        limit = Path(CGROUP, "memory.max").read_text().strip()
        if limit != "max":
            used = int(Path(CGROUP, "memory.current").read_text())
            stat = dict(line.split() for line in Path(CGROUP, "memory.stat").read_text().splitlines())
            free.append(int(limit) - used + int(stat.get("file", 0)))
    except (OSError, ValueError):  # cgroup v1, or none
        pass
    try:
        meminfo = dict(line.split(":") for line in Path(MEMINFO).read_text().splitlines())
        free.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    return min(free) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if free else None


def plan(settings, device, backend: str, config, row_tokens: int) -> Plan:
    """The micro-batch, accumulation and checkpointing for this process's GPU (as given without one, or without
    the model's configuration). row_tokens: the longest sequence a micro-batch holds per row (MAX_SEQ_LENGTH when
    packing). ConfigInvalid when LORA_R is above what the configuration's layers can use (check_rank), with or
    without a GPU; OutOfMemory when nothing fits."""
    given = (settings.PER_DEVICE_BATCH_SIZE, settings.GRAD_ACCUM_STEPS)
    sizes = shape(config, settings) if config is not None else None
    if sizes is not None:
        check_rank(settings, sizes, config)
    if not device.cuda:
        return Plan(*given, False, None, None, "no GPU: as given")
    if sizes is None:
        return Plan(*given, True, None, None, "BASE_MODEL's configuration is unreadable: as given, checkpointing on")
    import torch

    # Every rank plans with the least free memory of any: one plan for all, or DDP hangs.
    free = distributed.least(device, torch.cuda.mem_get_info(device.local_rank)[0])
    host = host_free()
    host = distributed.least(device, host) if host is not None else None
    gpu = f"GPU {device.local_rank}" if device.world_size == 1 else "the fullest GPU"
    return choose(settings, backend, sizes, row_tokens, free, gpu, host)


def choose(settings, backend: str, sizes: Shape, row_tokens: int, free: int, gpu: str = "the GPU",
           host: int | None = None) -> Plan:  # fmt: skip
    """With AUTO_BATCH, the fastest split of the step's sequences that fits: checkpointing off first (it costs
    about a third of a step), then the widest micro-batch. Without, the given split if it fits at all. host: the
    host memory free for unsloth's offloaded checkpoints (None: not known, not checked)."""
    given = (settings.PER_DEVICE_BATCH_SIZE, settings.GRAD_ACCUM_STEPS)
    batch = given[0] * given[1]
    if settings.AUTO_BATCH:
        options = [(m, ckpt) for ckpt in (False, True) for m in range(batch, 0, -1) if batch % m == 0]
    else:
        options = [(given[0], True)]
    for micro, ckpt in options:
        need = estimate(sizes, settings, backend, micro * row_tokens, ckpt)
        pinned = offload(sizes, backend, micro * row_tokens, ckpt)
        if need <= FILL * free and (host is None or pinned <= FILL * host):
            why = (f"the fastest split of {batch} sequences that fits {FILL:.0%} of the free memory"
                   if settings.AUTO_BATCH else "as given (AUTO_BATCH=false)")  # fmt: skip
            if pinned:
                known = f" of the {host / GIB:.1f} GiB free" if host is not None else ""
                why += f"; unsloth offloads {pinned / GIB:.1f} GiB of checkpointed activations to host memory{known}"
            return Plan(micro, batch // micro, ckpt, round(need / GIB, 2), round(free / GIB, 2), why,
                        round(pinned / GIB, 2) if pinned else None)  # fmt: skip
    if need > free:
        raise OutOfMemory(
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
    if host is not None and pinned > host:
        raise OutOfMemory(
            f"training needs about {pinned / GIB:.1f} GiB of host memory for unsloth's offloaded activation "
            f"checkpoints ({micro} sequence(s) of {row_tokens} tokens per micro-batch) and this container has "
            f"{host / GIB:.1f} GiB free: lower MAX_SEQ_LENGTH (now {settings.MAX_SEQ_LENGTH}), or give the container "
            "more memory (the pod's memory limit)"
        )
    # the leanest (or the given) split, with less room than the estimate's error
    log.warning("training needs about %.1f GiB of the %.1f GiB free on %s: it may run out of memory",
                need / GIB, free / GIB, gpu)  # fmt: skip
    return Plan(micro, batch // micro, ckpt, round(need / GIB, 2), round(free / GIB, 2), "the leanest split; tight",
                round(pinned / GIB, 2) if pinned else None)  # fmt: skip
