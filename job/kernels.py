"""The attention kernel that training batches run on, named in the log, metrics.json and the manifest; and the CUDA 12
runtime that PyPI's xformers needs beside torch's CUDA 13 one.

Unsloth (attention_dispatch.select_attention_backend) runs packed and padding-free rows on flash-attn's varlen kernel
when flash_attn imports, else on xformers' block-diagonal kernel when xformers loads, else on PyTorch SDPA: one
varlen_attn call where torch has one with enable_gqa (2.12+, sm_80+; it then prefers it to xformers), otherwise one
SDPA call per row. transformers (the hf backend) finds the rows in position_ids when no attention_mask is given
(masking_utils.find_packed_sequence_indices) and runs its attention over the whole packed row with a dense
block-diagonal causal mask (sdpa_attention: one SDPA call with attn_mask, which rules out SDPA's flash kernel).
"""

import ctypes
import functools
import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# xformers 0.0.35 on PyPI is a CUDA 12.8 build: its _C.so needs this soname, which torch's CUDA 13 wheels do not
# ship; PyPI's nvidia-cuda-runtime-cu12 installs it as nvidia/cuda_runtime/lib/libcudart.so.12.
CUDART = "libcudart.so.12"

PER_ROW = "SDPA, one call per row"
# Unsloth's answers (FLASH_VARLEN, XFORMERS, SDPA, FLASH_DENSE in attention_dispatch) in words, packed and padded.
UNSLOTH_PACKED = {"flash_varlen": "flash-attention varlen", "xformers": "xformers block-diagonal", "sdpa": PER_ROW}
UNSLOTH_PADDED = {"flash_dense": "flash-attention", "xformers": "xformers", "sdpa": "SDPA"}
# transformers' attn_implementation in words (the job loads with its default, sdpa).
HF = {"sdpa": "SDPA", "eager": "eager attention", "flex_attention": "flex attention"}
# unsloth trains these families on transformers' flex attention: its masks (torch's create_block_mask, compiled)
# hold the batch's length as a constant, so train pads packed batches to one length for them.
FLEX_FAMILIES = ("gemma3", "gemma3_text")
# Families whose model builds its attention mask without position_ids (transformers 5.17's GptOssModel), so rows
# packed into one sequence attend to each other: they train one row per sequence (tests/test_packing.py measures
# every family, and fails once one of these keeps its rows apart).
MIXES_PACKED_ROWS = ("gpt_oss",)

# Measured on an H200 (torch 2.11+cu130, unsloth 2026.10.9, Llama-3-8B, short Alpaca-like rows packed; issue 18).
SLOW = (
    "packed rows run on %s: unsloth found no varlen or block-diagonal attention kernel (xformers, flash-attn, or "
    "torch 2.12's varlen_attn). Measured on an H200: 11,938 useful tokens/s, 77%% of full rows' 15,427, where "
    "xformers' block-diagonal kernel trains them at 16,029 (one attention layer over 16,384 tokens in 85 rows: 24.0 "
    "ms against 1.85 ms). Fix: install xformers and the CUDA 12 runtime it loads (pip install xformers==0.0.35 "
    "nvidia-cuda-runtime-cu12), as the image does"
)


def kernel_name(backend: str, padding_free: bool, choice: str | None, torch_varlen: bool = False) -> str:
    """The attention kernel of the training batches, in words. choice: for unsloth, what select_attention_backend
    answers (use_varlen=padding_free); for hf, the model's attn_implementation. torch_varlen: unsloth loaded torch's
    varlen_attn, which its SDPA path takes for packed rows."""
    if backend == "unsloth":
        if not padding_free:
            return UNSLOTH_PADDED.get(choice, str(choice)) + ", padded rows"
        if choice == "sdpa" and torch_varlen:
            return "PyTorch varlen"
        return UNSLOTH_PACKED.get(choice, str(choice))
    name = HF.get(choice, str(choice))
    if not padding_free:
        return name + ", padded rows"
    return "flash-attention varlen" if str(choice).startswith("flash") else name + " with a block-diagonal mask"


def attention(backend: str, padding_free: bool, model) -> str:
    """The kernel this process trains with: unsloth's own choice (after `import unsloth`), or the model's own
    attn_implementation (the hf backend, and unsloth's flex-attention families)."""
    if backend == "unsloth" and not compiles_per_length(model):
        from unsloth.utils import attention_dispatch as dispatch

        choice = dispatch.select_attention_backend(use_varlen=padding_free)
        return kernel_name(backend, padding_free, choice, getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None)
    return kernel_name("hf", padding_free, model.config._attn_implementation)  # transformers' attention


def compiles_per_length(model) -> bool:
    """Whether unsloth trains the model on flex attention (its own attention dispatch serves the others)."""
    config = getattr(model, "config", None)
    family, implementation = getattr(config, "model_type", None), getattr(config, "_attn_implementation", None)
    return family in FLEX_FAMILIES or implementation == "flex_attention"


def sort_block_masks_in_aten() -> None:
    """Has inductor sort with ATen when it compiles transformers' flex-attention masks, as torch 2.13 does (its
    flex_attention._dense_to_ordered marks the argsort fallback_to_eager). torch 2.11 compiles that argsort into a
    Triton bitonic sort that ptxas takes minutes over (pytorch/pytorch#182060): on an H200, Gemma-3-1B had no first
    step after 220 s, and a stack dump showed ptxas under create_block_mask, before any decoder layer ran. Without
    persistent reductions inductor has no Triton sort (ir.Sort.create) and calls aten.sort; the mask is the same."""
    import torch
    from torch._inductor import config
    from transformers import masking_utils

    build = masking_utils.create_block_mask
    if getattr(build, "sorts_in_aten", False):
        return

    @functools.wraps(build)
    def create_block_mask(*args, **kwargs):
        if torch.compiler.is_compiling():  # inside another compiled region, whose options hold
            return build(*args, **kwargs)
        with config.patch({"triton.persistent_reductions": False}):
            return build(*args, **kwargs)

    create_block_mask.sorts_in_aten = True
    masking_utils.create_block_mask = create_block_mask


def packs_apart(config) -> bool:
    """Whether rows packed into one sequence, told apart by position_ids alone, stay apart in the attention of a
    model of this configuration (None: not known, taken as yes)."""
    return getattr(config, "model_type", None) not in MIXES_PACKED_ROWS


def announce(kernel: str) -> None:
    """Logs the kernel; warns, with the cost and the fix, when packed rows take one SDPA call each."""
    log.info("attention: %s", kernel, extra={"fields": {"attention": kernel}})
    if kernel == PER_ROW:
        log.warning(SLOW, kernel, extra={"fields": {"attention": kernel}})


def load_cuda_runtime() -> Path | None:
    """Loads libcudart.so.12 from the installed nvidia-cuda-runtime-cu12, so that xformers' later dlopen of the soname
    finds it without LD_LIBRARY_PATH; the file loaded, or None when the soname already loads or the package is
    absent. A file that will not load is a warning: unsloth then trains without xformers, and says so."""
    try:
        ctypes.CDLL(CUDART)
        return None
    except OSError:
        pass
    path = cuda_runtime_file()
    if path is None:
        return None
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("cannot load %s (%s): xformers will not load; reinstall nvidia-cuda-runtime-cu12", path, exc)
        return None
    log.info("loaded %s for xformers", path)
    return path


def cuda_runtime_file() -> Path | None:
    """libcudart.so.12 in the nvidia package's folders (nvidia-cuda-runtime-cu12), or None."""
    spec = importlib.util.find_spec("nvidia")
    for folder in (spec and spec.submodule_search_locations) or []:
        path = Path(folder) / "cuda_runtime" / "lib" / CUDART
        if path.is_file():
            return path
    return None
