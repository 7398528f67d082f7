"""report.md: what ran, on what, how it went, and the samples, for a person reading the run's folder."""


def _cut(text: str | None, limit: int = 400) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[:limit] + " …"


def _quote(text: str | None) -> str:
    return "\n".join("> " + line for line in (_cut(text) or "(empty)").splitlines())


def render(summary, samples: list[dict], config: dict) -> str:
    m, dataset = summary.metrics, summary.dataset
    # The trainer counts the tokens it reads, not the labels: the share of the training rows' tokens (cut at
    # MAX_SEQ_LENGTH) that count in the loss, applied to the tokens read, estimates those.
    share = dataset["train_loss_tokens"] / dataset["train_tokens"]
    loss_tokens = round(m.tokens * share)
    lines = [
        f"# Fine-tuning run `{summary.run_id}`" + (" (dry run)" if summary.dry_run else ""),
        "",
        f"- **Base model:** `{summary.base_model['name']}` (loaded: {summary.base_model['loaded']})",
        f"- **Backend:** {summary.backend}",
        f"- **Dataset:** `{dataset['uri']}`: {dataset['rows']} rows in {len(dataset['files'])} file(s), "
        f"format {dataset['format']}, {dataset['train_rows']} for training, {dataset['eval_rows']} held out; "
        f"{dataset['truncated_rows']} training rows cut at MAX_SEQ_LENGTH, {dataset['rows_without_trained_tokens']} "
        "of them with no response token left"
        + (
            f" (estimated from {dataset['truncated_rows_estimated_from']} rows: a dry run tokenizes a sample)"
            if dataset.get("truncated_rows_estimated_from")
            else ""
        ),
        f"- **Chat template:** {summary.chat_template}",
        "",
        "## Training",
        "",
        "| steps | epochs | rows | tokens | in the loss | first loss | final loss | eval loss | tokens/s "
        "| first step s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {m.steps} | {m.epochs} | {m.rows} | {m.tokens} | {loss_tokens} | {_num(m.first_loss)} | "
        f"{_num(m.final_loss)} | {_num(m.eval_loss)} | {m.tokens_per_second} | {m.seconds_to_first_step} | "
        f"{_num(m.peak_gpu_memory_gib)} |",
        "",
        f"Each step: {m.micro_batch * m.grad_accum} sequences per GPU x {summary.world_size} GPU(s), as "
        f"micro-batches of {m.micro_batch} x {m.grad_accum} accumulated; packing {m.packing}; attention {m.attention}; "
        f"activation checkpointing {'on' if m.activation_checkpointing else 'off'}"
        + (
            f"; peak GPU memory estimated at {m.estimated_peak_gpu_memory_gib} GiB before loading"
            if m.estimated_peak_gpu_memory_gib
            else ""
        )
        + ". Rows: epochs x training rows; tokens: every token the model read, prompts too, padding not; in the "
        + (
            f"loss: about {share:.0%} of them, the responses' only (assistant turns and completions, "
            "TRAIN_ON_RESPONSES_ONLY=true)"
            if config["TRAIN_ON_RESPONSES_ONLY"]
            else "loss: all of them (TRAIN_ON_RESPONSES_ONLY=false)"
        )
        + "; first step: seconds from the process's start."
        + (
            f" A SIGTERM needs about {summary.grace_period_needed_seconds} s to commit a checkpoint (the longest step,"
            f" a save, an upload): give the pod terminationGracePeriodSeconds of at least "
            f"{summary.termination_grace_period_seconds}."
            if summary.grace_period_needed_seconds is not None
            else ""
        ),
        "",
        "![loss against step](loss.png)",
        "",
        "## Attempts",
        "",
        "| attempt | host | started | resumed from step |",
        "|---|---|---|---|",
        *(
            f"| {a['attempt']} | {a['host']} | {a['started_at']} | {a['resumed_from_step'] or '-'} |"
            for a in summary.attempts
        ),  # fmt: skip
        "",
        "## Seconds per stage",
        "",
        "| " + " | ".join(summary.timings) + " |",
        "|" + "---|" * len(summary.timings),
        "| " + " | ".join(f"{s:.1f}" for s in summary.timings.values()) + " |",
        "",
        "## Samples",
        "",
        "Greedy decoding; *fine-tuned* is the adapter reloaded from `adapter/`, *base* the same model with the"
        " adapter disabled." + (" These prompts were seen in training." if summary.samples_seen_in_training else ""),
    ]
    for i, row in enumerate(samples, 1):
        lines += ["", f"### {i}", "", "**Prompt**", "", _quote(row["prompt"]), "", "**Fine-tuned**", "",
                  _quote(row["response"]), "", "**Base**", "", _quote(row["base_response"])]  # fmt: skip
        if row.get("reference") is not None:
            lines += ["", "**Reference**", "", _quote(row["reference"])]
    lines += [
        "",
        "## Files",
        "",
        "- [adapter/](adapter/): the PEFT LoRA adapter and the tokenizer with its chat template (README.md: how to"
        " load it)",
        *(
            ["- [merged/](merged/): the adapter merged into the base model's 16-bit weights"]
            if config.get("EXPORT") == "merged_16bit"
            else []
        ),
        "- [samples.jsonl](samples.jsonl), [metrics.json](metrics.json), [train_log.jsonl](train_log.jsonl),"
        " [loss.png](loss.png), [config.json](config.json)",
        "- [manifest.json](manifest.json): every file with its size and sha256; written last",
        "",
        "## Configuration",
        "",
        "| variable | value |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in config.items() if v is not None and k != "DATASET_FILES"),
        "",
    ]
    return "\n".join(lines)


def _value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


# Settings a reader of the adapter wants beside it (the full configuration is in ../config.json).
CARD_SETTINGS = ("LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGET_MODULES", "LOAD_IN_4BIT", "MAX_SEQ_LENGTH",
                 "PACKING", "TRAIN_ON_RESPONSES_ONLY", "LEARNING_RATE", "LR_SCHEDULER", "OPTIMIZER",
                 "PER_DEVICE_BATCH_SIZE", "GRAD_ACCUM_STEPS", "MAX_STEPS", "NUM_EPOCHS", "SEED")  # fmt: skip


def model_card(summary, config: dict) -> str:
    """adapter/README.md: what the adapter is, how it was trained, and how to load it with peft, unsloth and vLLM."""
    base, m, dataset = summary.base_model["name"], summary.metrics, summary.dataset
    hub = "://" not in base and not base.startswith(("/", ".", "~"))
    digest = ", ".join(f"`{f['path']}` sha256 {f['sha256'][:16]}…" for f in dataset["files"][:5])
    source = f'"{base}"' if hub else '"/path/to/base-model"  # a local copy of ' + base
    front = ["---", *([f"base_model: {base}"] if hub else []), "library_name: peft", "pipeline_tag: text-generation",
             "tags: [lora, sft, trl" + (", unsloth" if summary.backend == "unsloth" else "") + "]", "---"]  # fmt: skip
    lines = [
        *front,
        "",
        f"# LoRA adapter of run `{summary.run_id}`"
        + (" (dry run: a tiny random model, not for use)" if summary.dry_run else ""),
        "",
        f"A LoRA adapter for `{base}`, trained with TRL's SFTTrainer ({summary.backend} backend) on `{dataset['uri']}`:"
        f" {dataset['train_rows']} training rows ({dataset['format']}; {digest}), {m.steps} steps, {m.epochs} epochs,"
        f" {m.tokens:,} tokens. Its tokenizer, saved beside it, carries the chat template it was trained with"
        f" ({summary.chat_template}).",
        "",
        "| first loss | final loss | eval loss |",
        "|---|---|---|",
        f"| {_num(m.first_loss)} | {_num(m.final_loss)} | {_num(m.eval_loss)} |",
        "",
        "The run's report, with samples, the loss curve and every setting: [../report.md](../report.md).",
        "",
        "| setting | value |",
        "|---|---|",
        *(
            f"| {k} | `{_value(config[k])}` |"
            for k in CARD_SETTINGS
            if config.get(k) is not None and not (k == "NUM_EPOCHS" and config.get("MAX_STEPS"))
        ),
        "",
        "## Load it",
        "",
        "With transformers and peft:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained({source}, device_map="auto")',
        'model = PeftModel.from_pretrained(base, "path/to/adapter")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")',
        "```",
        "",
        "With Unsloth (it finds the base model through `base_model_name_or_path` in adapter_config.json"
        + ("" if hub else "; set it to your local copy first")
        + "):",
        "",
        "```python",
        "from unsloth import FastLanguageModel",
        "",
        'model, tokenizer = FastLanguageModel.from_pretrained("path/to/adapter", max_seq_length='
        f"{config.get('MAX_SEQ_LENGTH')}, load_in_4bit=True)",
        "FastLanguageModel.for_inference(model)",
        "```",
        "",
        "With vLLM's LoRA support (it serves adapters on a 16-bit base model: for a pre-quantized base such as"
        " `unsloth/llama-3-8b-bnb-4bit`, give its 16-bit original, `unsloth/llama-3-8b`):",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "from vllm.lora.request import LoRARequest",
        "",
        f'llm = LLM(model="<the 16-bit base model>", enable_lora=True, max_lora_rank={config.get("LORA_R")})',
        'outputs = llm.generate(["..."], SamplingParams(max_tokens=128), lora_request=LoRARequest("adapter", 1, '
        '"path/to/adapter"))',
        "```",
        "",
    ]
    return "\n".join(lines)
