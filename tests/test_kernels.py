"""The attention kernel is named, and packed rows on one SDPA call each are a warning with the cost and the fix;
the CUDA 12 runtime that xformers needs loads from PyPI's nvidia-cuda-runtime-cu12 without LD_LIBRARY_PATH."""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from job import kernels
from tests.conftest import ROOT

WHEELS = ROOT / ".gpu-wheels"  # the GPU lock's wheels, where a checkout has them


@pytest.mark.parametrize(
    "backend, padding_free, choice, torch_varlen, name",
    [
        # unsloth: what attention_dispatch.select_attention_backend answers, and whether torch's varlen_attn loaded
        ("unsloth", True, "xformers", False, "xformers block-diagonal"),
        ("unsloth", True, "flash_varlen", False, "flash-attention varlen"),
        ("unsloth", True, "sdpa", True, "PyTorch varlen"),
        ("unsloth", True, "sdpa", False, "SDPA, one call per row"),
        ("unsloth", False, "xformers", False, "xformers, padded rows"),
        # hf: the model's attn_implementation
        ("hf", True, "sdpa", False, "SDPA with a block-diagonal mask"),
        ("hf", True, "flash_attention_2", False, "flash-attention varlen"),
        ("hf", False, "sdpa", False, "SDPA, padded rows"),
    ],
)
def test_the_kernel_is_named(backend, padding_free, choice, torch_varlen, name):
    assert kernels.kernel_name(backend, padding_free, choice, torch_varlen) == name


def test_packed_rows_on_one_sdpa_call_each_warn_with_the_cost_and_the_fix(caplog):
    with caplog.at_level(logging.INFO, logger="job.kernels"):
        kernels.announce("xformers block-diagonal")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert caplog.records[0].fields == {"attention": "xformers block-diagonal"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="job.kernels"):
        kernels.announce(kernels.kernel_name("unsloth", True, "sdpa"))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("packed rows run on SDPA, one call per row")
    assert "77%" in warning and "pip install xformers==0.0.35 nvidia-cuda-runtime-cu12" in warning


def test_hf_packed_rows_run_one_sdpa_call_with_a_block_diagonal_mask(tiny_model_dir, monkeypatch):
    """What the name says is what transformers does: rows told apart by position_ids alone (TRL's padding-free
    collator gives no attention_mask) reach SDPA once per layer, with the rows' block-diagonal causal mask."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert kernels.attention("hf", True, model) == "SDPA with a block-diagonal mask"
    assert kernels.attention("hf", False, model) == "SDPA, padded rows"
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recorded(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    lengths = torch.tensor([3, 5, 2])
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 10)), position_ids=positions, use_cache=False)
    row = torch.repeat_interleave(torch.arange(3), lengths)
    block_diagonal = (row[:, None] == row[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    assert len(masks) == model.config.num_hidden_layers
    assert all(m is not None and m.dtype == torch.bool and torch.equal(m[0, 0], block_diagonal) for m in masks)


PROBE = """
import ctypes, json
from job import kernels

def loads():
    try:  # by soname, as the dynamic loader resolves the NEEDED entry of xformers' _C.so
        ctypes.CDLL(kernels.CUDART)
        return True
    except OSError:
        return False

before = loads()
loaded = kernels.load_cuda_runtime()
print(json.dumps({"before": before, "loaded": loaded and str(loaded), "after": loads()}))
"""


def probe(*flags: str, path: Path | None = None) -> dict:
    """load_cuda_runtime in a fresh process (a loaded library stays loaded): the soname before and after."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(str(p) for p in (path, ROOT) if p)}
    result = subprocess.run([sys.executable, *flags, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_the_cuda_12_runtime_loads_from_its_package_without_ld_library_path(tmp_path):
    site = None  # the installed package (the GPU image's), else the lock's wheel unpacked
    if importlib.util.find_spec("nvidia") is None or kernels.cuda_runtime_file() is None:
        wheels = sorted(WHEELS.glob("nvidia_cuda_runtime_cu12-*.whl"))
        if not wheels:
            pytest.skip("nvidia-cuda-runtime-cu12 is not installed: pip install nvidia-cuda-runtime-cu12")
        site = tmp_path / "site"
        zipfile.ZipFile(wheels[-1]).extractall(site)
    state = probe(path=site)
    if state["before"]:  # a CUDA 12 toolkit on the loader's path: nothing to do
        assert state == {"before": True, "loaded": None, "after": True}
    else:
        assert state["after"] and state["loaded"].endswith("nvidia/cuda_runtime/lib/libcudart.so.12")
        assert site is None or Path(state["loaded"]).is_relative_to(site)


def test_without_the_package_nothing_happens():
    state = probe("-S")  # no site-packages: no nvidia package
    assert state["loaded"] is None and state["after"] == state["before"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_unsloth_packs_rows_with_a_varlen_or_block_diagonal_kernel_where_xformers_is_installed():
    """Issue 18 on the GPU image: xformers (a CUDA 12.8 build beside torch's CUDA 13) loads once the job has loaded the
    CUDA 12 runtime, and unsloth no longer packs rows with one SDPA call each."""
    if importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed")
    code = (
        "from job import kernels; kernels.load_cuda_runtime(); import unsloth; "
        "print(kernels.attention('unsloth', True, None))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] != kernels.PER_ROW, result.stdout[-3000:]


def test_unsloth_trains_gemma_3_on_transformers_attention_compiled_per_length():
    """unsloth runs Gemma 3 on transformers' flex attention, not on its own dispatch (which would answer xformers):
    the name is the model's attention, and the batches are padded to one length (train.sft_config's one_length)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 256}  # fmt: skip
    gemma = AutoModelForCausalLM.from_config(Gemma3TextConfig(head_dim=32, **shape))
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
    assert kernels.compiles_per_length(gemma) and not kernels.compiles_per_length(llama)
    # unsloth is not installed here: its dispatch would raise, so the answer is the model's own attention.
    assert kernels.attention("unsloth", True, gemma) == "SDPA with a block-diagonal mask"
    gemma.config._attn_implementation = "flex_attention"  # what unsloth loads Gemma 3 with on a GPU
    assert kernels.attention("unsloth", True, gemma) == "flex attention with a block-diagonal mask"
    with pytest.raises(ImportError):
        kernels.attention("unsloth", True, llama)


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="inductor on CPU needs a C++ compiler")
def test_flex_masks_compile_with_atens_sort_and_stay_the_same(monkeypatch):
    """torch 2.11 compiles create_block_mask's argsort into a Triton sort that ptxas takes minutes over (Gemma 3 had
    no first step): the job compiles the masks without persistent reductions, so inductor sorts with ATen, and each
    mask is the one built without compiling."""
    import torch
    from torch._inductor import config
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "create_block_mask", masking_utils.create_block_mask)  # put back afterwards
    rows = torch.tensor([0] * 300 + [1] * 500 + [2] * 224)  # three rows packed into 1,024 tokens
    traced = []

    def packed_causal(b, h, q, kv):
        traced.append(config.triton.persistent_reductions)  # runs while dynamo traces it
        return (q >= kv) & (rows[q] == rows[kv])

    expected = masking_utils.create_block_mask(packed_causal, 1, 1, 1024, 1024, device="cpu", _compile=False)
    traced.clear()
    kernels.sort_block_masks_in_aten()
    kernels.sort_block_masks_in_aten()  # wraps once
    assert not getattr(masking_utils.create_block_mask.__wrapped__, "sorts_in_aten", False)
    mask = masking_utils.create_block_mask(packed_causal, 1, 1, 1024, 1024, device="cpu", _compile=True)
    assert traced and not any(traced), traced
    assert config.triton.persistent_reductions  # only while the mask compiles
    assert torch.equal(mask.to_dense(), expected.to_dense()) and mask.to_dense().sum() < mask.to_dense().numel()
