"""bench/synthetic_model.py's NF4 checkpoints, written module by module, are what transformers' bitsandbytes quantizer
writes (the same files, tensor for tensor), load with from_pretrained, and dequantize to the weights that were
written; sharded as save_pretrained shards. On CPU at the dry run's size: bitsandbytes 0.50 quantizes on CPU.

bitsandbytes is in the GPU set: where it is not installed, the GPU lock's wheel (.gpu-wheels) is unpacked, and the
checks run in a fresh process (transformers decides once per process whether bitsandbytes is there)."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

WHEELS = ROOT / ".gpu-wheels"

PROBE = """
import json, sys
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from bench.synthetic_model import build_nf4, nf4_config, random_tensors, write_nf4

shape, folder = sys.argv[1], Path(sys.argv[2])
build_nf4(shape, folder / "nf4", tiny=True)
config = AutoConfig.from_pretrained(folder / "nf4")
del config.quantization_config
written = {name: tensor.clone() for name, tensor in random_tensors(config, "cpu")}

# What was written, loaded by transformers: each 4-bit weight dequantizes as bitsandbytes' own round trip of the
# written tensor does, the rest is the written tensor.
mine, info = AutoModelForCausalLM.from_pretrained(folder / "nf4", device_map={"": "cpu"}, output_loading_info=True)
fourbit = {f"{n}.weight": m for n, m in mine.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
exact, error = [], []
for name, module in fourbit.items():
    loaded = dequantize_4bit(module.weight.data, module.weight.quant_state)
    trip = dequantize_4bit(*quantize_4bit(written[name], compress_statistics=True, quant_type="nf4"))
    exact.append(torch.equal(loaded, trip))
    error.append(((loaded.float() - written[name].float()).norm() / written[name].float().norm()).item())
others = {n: p for n, p in mine.named_parameters() if n not in fourbit}

# The same tensors saved in 16-bit, quantized by transformers on loading and saved again.
full = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
full.load_state_dict(written)
full.save_pretrained(folder / "bf16")
theirs = AutoModelForCausalLM.from_pretrained(folder / "bf16", quantization_config=nf4_config(), device_map={"": "cpu"})
theirs.save_pretrained(folder / "transformers")
a, b = load_file(folder / "nf4" / "model.safetensors"), load_file(folder / "transformers" / "model.safetensors")
configs = [json.loads((folder / f / "config.json").read_text()) for f in ("nf4", "transformers")]
ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
with torch.no_grad():
    logits = [mine(ids).logits, theirs(ids).logits]

# Shards of about 50 kB: the index maps every tensor, and the shards hold the single file's tensors.
write_nf4(config, random_tensors(config, "cpu"), folder / "sharded", shard_bytes=50_000)
index = json.loads((folder / "sharded" / "model.safetensors.index.json").read_text())
sharded = {}
for file in sorted(set(index["weight_map"].values())):
    sharded |= load_file(folder / "sharded" / file)
_, sharded_info = AutoModelForCausalLM.from_pretrained(folder / "sharded", device_map={"": "cpu"},
                                                       output_loading_info=True)

print(json.dumps({
    "fourbit": sorted(fourbit), "written": sorted(written), "others_equal": all(torch.equal(p, written[n])
    for n, p in others.items()), "exact": exact, "error": error,
    "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
    "same_keys": sorted(a) == sorted(b), "same_tensors": sorted(k for k in a if k in b and a[k].dtype == b[k].dtype
    and a[k].shape == b[k].shape and torch.equal(a[k], b[k])), "keys": sorted(a),
    "quantization_configs": [c["quantization_config"] for c in configs],
    "config_differences": sorted(k for k in configs[0].keys() | configs[1].keys()
                                 if configs[0].get(k) != configs[1].get(k)),
    "same_logits": torch.equal(*logits), "finite": bool(torch.isfinite(logits[0]).all()),
    "shards": sorted(set(index["weight_map"].values())), "sharded_keys": sorted(index["weight_map"]),
    "sharded_equal": sorted(sharded) == sorted(a) and all(torch.equal(sharded[k], a[k]) for k in a),
    "sharded_missing": sorted(sharded_info["missing_keys"]),
    "sharded_unexpected": sorted(sharded_info["unexpected_keys"]),
}))
"""


@pytest.fixture(scope="module")
def bitsandbytes_path(tmp_path_factory) -> Path | None:
    """None where bitsandbytes is installed; else the GPU lock's wheel, unpacked."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        return None
    wheels = sorted(WHEELS.glob("bitsandbytes-*.whl"))
    if not wheels:
        pytest.skip(
            "bitsandbytes is not installed and .gpu-wheels has no wheel of it: pip install bitsandbytes==0.50.2"
        )
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheels[-1]).extractall(site)
    return site


@pytest.mark.parametrize("shape", ["llama-3.1-70b", "qwen3-32b"])
def test_an_nf4_checkpoint_written_module_by_module_is_the_one_transformers_writes(shape, bitsandbytes_path, tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join(str(p) for p in (bitsandbytes_path, ROOT) if p)}
    result = subprocess.run([sys.executable, "-c", PROBE, shape, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    # Every linear weight of the layers is 4-bit (7 a layer, 2 layers); embeddings, norms and the LM head are not.
    assert len(found["fourbit"]) == 14 and all(".layers." in name for name in found["fourbit"]), found["fourbit"]
    assert "lm_head.weight" in found["written"] and "model.embed_tokens.weight" in found["written"]
    assert all(found["exact"]) and found["others_equal"], "loaded weights are what was written, through NF4"
    assert max(found["error"]) < 0.15, found["error"]  # NF4 of normal weights: about 10% in norm
    assert not found["missing"] and not found["unexpected"], found
    # Tensor for tensor the file transformers writes: packed weights, quant_state tensors, the rest in bf16.
    assert found["same_keys"] and found["same_tensors"] == found["keys"], set(found["keys"]) - set(
        found["same_tensors"]
    )
    assert any(key.endswith(".weight.quant_state.bitsandbytes__nf4") for key in found["keys"])
    mine, theirs = found["quantization_configs"]
    assert mine == theirs and mine["bnb_4bit_quant_type"] == "nf4" and mine["bnb_4bit_use_double_quant"]
    assert found["config_differences"] == [], found["config_differences"]
    assert found["same_logits"] and found["finite"]
    assert len(found["shards"]) > 1 and found["shards"][0] == f"model-00001-of-{len(found['shards']):05d}.safetensors"
    assert found["sharded_keys"] == found["keys"] and found["sharded_equal"]
    assert not found["sharded_missing"] and not found["sharded_unexpected"]
