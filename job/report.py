"""report.md: what ran, on what, how it went, and the samples, for a person reading the run's folder."""


def _cut(text: str | None, limit: int = 400) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[:limit] + " …"


def _quote(text: str | None) -> str:
    return "\n".join("> " + line for line in (_cut(text) or "(empty)").splitlines())


def render(summary, samples: list[dict], config: dict) -> str:
    m, dataset = summary.metrics, summary.dataset
    lines = [
        f"# Fine-tuning run `{summary.run_id}`" + (" (dry run)" if summary.dry_run else ""),
        "",
        f"- **Base model:** `{summary.base_model['name']}` (loaded: {summary.base_model['loaded']})",
        f"- **Backend:** {summary.backend}",
        f"- **Dataset:** `{dataset['uri']}`: {dataset['rows']} rows in {len(dataset['files'])} file(s), "
        f"format {dataset['format']}, {dataset['train_rows']} for training, {dataset['eval_rows']} held out; "
        f"{dataset['truncated_rows']} training rows cut at MAX_SEQ_LENGTH, {dataset['rows_without_trained_tokens']} "
        "of them with no response token left",
        f"- **Chat template:** {summary.chat_template}",
        "",
        "## Training",
        "",
        "| steps | epochs | rows | tokens | first loss | final loss | eval loss | tokens/s | first step s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {m.steps} | {m.epochs} | {m.rows} | {m.tokens} | {_num(m.first_loss)} | {_num(m.final_loss)} | "
        f"{_num(m.eval_loss)} | {m.tokens_per_second} | {m.seconds_to_first_step} | {_num(m.peak_gpu_memory_gib)} |",
        "",
        f"Each step: {m.micro_batch * m.grad_accum} sequences per GPU x {summary.world_size} GPU(s), as "
        f"micro-batches of {m.micro_batch} x {m.grad_accum} accumulated; packing {m.packing}; activation checkpointing "
        f"{'on' if m.activation_checkpointing else 'off'}"
        + (
            f"; peak GPU memory estimated at {m.estimated_peak_gpu_memory_gib} GiB before loading"
            if m.estimated_peak_gpu_memory_gib
            else ""
        )
        + ". Rows: epochs x training rows; tokens: every token trained on, prompts too, padding not; first step: "
        "seconds from the process's start.",
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
        "- [adapter/](adapter/): the PEFT LoRA adapter and the tokenizer with its chat template",
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


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"
