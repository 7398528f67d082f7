"""EXPORT=merged_16bit: the merged model answers as the base model with the adapter (logits within 1e-4 in
float32 on CPU), through the entry point and through the reload path that 4-bit training takes; the 16-bit
weights are found or asked for, never the 4-bit ones merged into."""

import json

import pytest
import torch

from job import export
from job.errors import ConfigInvalid
from job.settings import Settings
from tests.conftest import DEMO_DATA, jsonl, put, read_objects

# float32: merged weights W + s*B@A against the adapter applied beside W differ by rounding only. Measured on the
# tiny Llama: at most 2e-6.
TOLERANCE = 1e-4
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def logits_with_adapter(base_dir, adapter_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)  # a family's is saved in bfloat16
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir)(IDS).logits


def logits_of(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(IDS).logits


def test_the_16bit_weights_are_found_or_asked_for():
    def source(quantized, **given):
        return export.source_16bit(Settings(DATASET_URI="x", OUTPUT_URI="y", **given), quantized)

    assert source(True, BASE_MODEL="unsloth/llama-3-8b-bnb-4bit") == "unsloth/llama-3-8b"
    assert source(False, BASE_MODEL="unsloth/llama-3-8b-bnb-4bit") == "unsloth/llama-3-8b", "config unreadable"
    assert source(True, BASE_MODEL="unsloth/Qwen3-8B-unsloth-bnb-4bit") == "unsloth/Qwen3-8B"
    assert source(False, BASE_MODEL="s3://b/models/llama/") == "s3://b/models/llama/"
    assert source(True, BASE_MODEL="s3://b/q/", BASE_MODEL_16BIT="s3://b/full/") == "s3://b/full/"
    with pytest.raises(ConfigInvalid, match="set BASE_MODEL_16BIT") as error:
        source(True, BASE_MODEL="s3://b/models/llama-4bit/")
    assert error.value.exit_code == 78


def test_the_reload_path_merges_into_the_16bit_base(tiny_model_dir, tmp_path):
    """As after 4-bit training: the training model is gone, the 16-bit base is loaded and the saved adapter merged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from job.context import Device, Run

    settings = Settings(DATASET_URI="x", OUTPUT_URI="y", BASE_MODEL=str(tiny_model_dir), LOAD_IN_4BIT=True,
                        SCRATCH_DIR=str(tmp_path))  # fmt: skip
    run = Run.build(settings, "merge", Device(False, False, 0, 0, 1), "hf")
    stage = run.stage
    torch.manual_seed(0)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    )
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    lora.save_pretrained(stage / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged = export.merge(settings, None, run, None, tokenizer, quantized=False)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    expected, got = logits_with_adapter(tiny_model_dir, stage / "adapter"), logits_of(merged)
    assert (got - expected).abs().max() <= TOLERANCE
    assert (got - logits_of(tiny_model_dir)).abs().max() > 100 * TOLERANCE, "the adapter is in the merged weights"


def test_a_run_with_export_publishes_a_merged_model_equal_to_base_plus_adapter(
    run_job, s3, bucket, tiny_model_dir, tmp_path
):
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:32]
    result = run_job({
        "BASE_MODEL": str(tiny_model_dir), "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(rows)),
        "OUTPUT_URI": f"s3://{bucket}/runs", "RUN_ID": "merged", "TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false",
        "OPTIMIZER": "adamw_torch", "MAX_STEPS": "4", "LEARNING_RATE": "5e-3", "EXPORT": "merged_16bit",
        "NUM_SAMPLE_PROMPTS": "1", "MAX_NEW_TOKENS": "2",
    })  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    objects = read_objects(s3, bucket, "runs/merged/")
    for name, body in objects.items():
        path = tmp_path / name.removeprefix("runs/merged/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    run = tmp_path
    manifest = json.loads((run / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {"merged/model.safetensors", "merged/config.json", "merged/tokenizer.json"} <= listed
    expected, got = logits_with_adapter(tiny_model_dir, run / "adapter"), logits_of(run / "merged")
    assert (got - expected).abs().max() <= TOLERANCE
    assert (got - logits_of(tiny_model_dir)).abs().max() > 100 * TOLERANCE, "the adapter is in the merged weights"


def test_a_4bit_checkpoint_without_its_16bit_original_is_78_before_training(
    run_job, s3, bucket, tiny_model_dir, tmp_path
):
    import shutil

    quantized = tmp_path / "model-4bit"
    shutil.copytree(tiny_model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:8]
    result = run_job({"BASE_MODEL": str(quantized), "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(rows)),
                      "OUTPUT_URI": f"s3://{bucket}/runs", "RUN_ID": "q", "TRAIN_BACKEND": "hf",
                      "LOAD_IN_4BIT": "false",
                      "OPTIMIZER": "adamw_torch", "EXPORT": "merged_16bit"})  # fmt: skip
    assert result.returncode == 78, result.stderr[-3000:]
    assert "set BASE_MODEL_16BIT" in result.stderr and '"stage": "train"' not in result.stderr


@pytest.mark.parametrize("shape", ["qwen3-0.6b", "gemma-3-1b", "mistral-7b-v0.3", "phi-4", "gpt-oss-20b"])
def test_each_familys_merged_model_answers_as_its_base_with_the_adapter(tmp_path, shape):
    """The reload path of 4-bit training, per family at the dry run's size (bench/synthetic_model.py), with the
    adapters the default LORA_TARGET_MODULES gives it (Phi-4's fused layers, gpt-oss's attention)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.synthetic_model import build
    from job import model
    from job.context import Device, Run

    build(shape, tmp_path / "base", tiny=True)
    settings = Settings(DATASET_URI="x", OUTPUT_URI="y", BASE_MODEL=str(tmp_path / "base"), LOAD_IN_4BIT=True,
                        SCRATCH_DIR=str(tmp_path))  # fmt: skip
    run = Run.build(settings, "merge", Device(False, False, 0, 0, 1), "hf")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(**model.lora_arguments(settings, base)))
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    lora.save_pretrained(run.stage / "adapter")
    merged = export.merge(settings, None, run, None, AutoTokenizer.from_pretrained(tmp_path / "base"), False)
    expected, got = logits_with_adapter(tmp_path / "base", run.stage / "adapter"), logits_of(merged)
    assert (got - expected).abs().max() <= TOLERANCE
    assert (got - logits_of(tmp_path / "base")).abs().max() > 100 * TOLERANCE, "the adapter is in the merged weights"
