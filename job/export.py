"""EXPORT=merged_16bit: the adapter merged into the base model's 16-bit weights, never into 4-bit ones, saved as
safetensors with its config and tokenizer in the stage's merged/ (published to OUTPUT_URI/RUN_ID/merged/)."""

import gc
import logging
import re
from pathlib import Path

from job.context import ADAPTER, Run
from job.errors import ConfigInvalid
from job.model import hub_token
from job.storage import Storage, is_s3

log = logging.getLogger(__name__)

MERGED = "merged"
# Unsloth's pre-quantized checkpoints and their 16-bit originals: unsloth/llama-3-8b-bnb-4bit -> unsloth/llama-3-8b,
# unsloth/Qwen3-8B-unsloth-bnb-4bit -> unsloth/Qwen3-8B.
PREQUANTIZED = re.compile(r"^(unsloth/.+?)(-unsloth)?-bnb-4bit$")


def source_16bit(settings, quantized: bool) -> str:
    """Where BASE_MODEL's 16-bit weights are: BASE_MODEL_16BIT, else BASE_MODEL itself when its checkpoint is not
    quantized (quantized: its config has a quantization_config), else a known pre-quantized id's original."""
    if settings.BASE_MODEL_16BIT:
        return settings.BASE_MODEL_16BIT
    if match := PREQUANTIZED.match(settings.BASE_MODEL):  # quantized, whether or not its config could be read
        return match[1]
    if not quantized:
        return settings.BASE_MODEL
    raise ConfigInvalid(
        f"EXPORT=merged_16bit: BASE_MODEL={settings.BASE_MODEL} holds 4-bit weights, and a merge into them loses "
        "the adapter's precision: set BASE_MODEL_16BIT to its 16-bit original (a Hub id, local folder or s3:// prefix)"
    )


def merge(settings, storage: Storage, run: Run, trained, tokenizer, quantized: bool) -> Path:
    """The merged model in the stage's merged/. trained: the training model when its base weights are 16-bit (they
    are merged in memory), else None: the caller has dropped it, and the 16-bit base is loaded and the saved adapter
    (the stage's adapter/) merged into it."""
    import torch

    target = run.stage / MERGED
    if trained is not None and not settings.LOAD_IN_4BIT:
        trained.set_adapter("default")  # the samples stage loaded the saved copy beside it as "saved"
        merged = trained.merge_and_unload(adapter_names=["default"])
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        gc.collect()
        if run.device.cuda:
            torch.cuda.empty_cache()
        source = source_16bit(settings, quantized)
        if is_s3(source):
            storage.locate(source, run.scratch / "base_16bit")
            source = str(run.scratch / "base_16bit")
        log.info("merging the adapter into the 16-bit weights of %s", source)
        cuda = run.device.cuda
        dtype = torch.bfloat16 if cuda else torch.float32
        base = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map="cuda" if cuda else None, token=hub_token(settings)
        )
        if getattr(base.config, "quantization_config", None) is not None:
            raise ConfigInvalid(f"BASE_MODEL_16BIT={source} holds quantized weights: give the 16-bit original")
        merged = PeftModel.from_pretrained(base, run.stage / ADAPTER).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
