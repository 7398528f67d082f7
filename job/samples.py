"""Sample inferences: the adapter as saved (reloaded from its files) beside the base model without it."""

import logging
from pathlib import Path

from job import templates
from job.logs import progress

log = logging.getLogger(__name__)

BATCH = 8


def generate(model, tokenizer, adapter_dir: Path, inputs: list[dict], max_new_tokens: int, backend: str) -> list[dict]:
    """One row per input: prompt, response (saved adapter), base_response (adapter disabled), reference."""
    if not inputs:
        return []
    # Load the adapter from the files just written, so a broken save shows up here, not in production.
    model.load_adapter(str(adapter_dir), adapter_name="saved")
    model.set_adapter("saved")
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    texts = [row["input"] for row in inputs]
    responses = _generate(model, tokenizer, texts, max_new_tokens, "samples (adapter)")
    with model.disable_adapter():
        base_responses = _generate(model, tokenizer, texts, max_new_tokens, "samples (base)")
    return [
        {"prompt": row["prompt"], "response": response, "base_response": base, "reference": row["reference"],
         "input": row["input"]}
        for row, response, base in zip(inputs, responses, base_responses)
    ]  # fmt: skip


def _generate(model, tokenizer, texts: list[str], max_new_tokens: int, desc: str) -> list[str]:
    import torch

    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    stop = templates.end_of_turn(tokenizer)  # EOS and the template's end-of-turn token (Llama 3 base: <|eot_id|>)
    outputs = []
    for start in progress(iterable=range(0, len(texts), BATCH), desc=desc, unit="batch"):
        batch = tokenizer(texts[start : start + BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        with torch.inference_mode():
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop,
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return outputs
