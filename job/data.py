"""Rows in, token ids and loss masks out.

Every format becomes one of two shapes: a chat ({"messages": [...]}, from alpaca, sharegpt and
messages rows), rendered with the chat template, or raw text ({"prompt", "completion"}, from
prompt_completion and text rows), used as written with EOS appended. The loss mask covers what the
model must learn to write: assistant turns and completions (all tokens when
TRAIN_ON_RESPONSES_ONLY is false). TRL's SFTTrainer takes the token ids and masks as they are and
builds labels, truncates and packs them.
"""

import gzip
import json
import logging
import os
import random
from pathlib import Path

from job.errors import ConfigInvalid, DatasetInvalid

log = logging.getLogger(__name__)

# Rendering (the chat template) and tokenizing take about 1 ms a row; a worker process costs about a second.
ROWS_PER_WORKER = 2000
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def read_rows(source: str, path: Path) -> list[tuple[int, dict]]:
    """(line or row number, row) for every row of a .jsonl, .json, .csv or .parquet file, optionally .gz."""
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
        elif name.endswith(".csv"):
            import pandas as pd

            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
            rows = [(i + 2, row) for i, row in enumerate(frame.to_dict("records"))]  # line 1 is the header
        else:
            # utf-8-sig: a byte-order mark (Excel, Windows editors) is dropped, not read as part of the first row
            with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8-sig") as f:
                text = f.read()
            rows = _parse_json(source, text, name.endswith(".json"))
    except DatasetInvalid:
        raise
    except UnicodeDecodeError:
        raise DatasetInvalid(f"{source}: not UTF-8 text: re-encode the file as UTF-8") from None
    except Exception as exc:  # pandas, pyarrow and gzip each raise their own kinds for a bad file
        raise DatasetInvalid(f"{source}: cannot be read ({type(exc).__name__}: {exc}): check the file") from None
    if not rows:
        raise DatasetInvalid(f"{source}: no rows: remove the file or fill it")
    for number, row in rows:
        if not isinstance(row, dict):
            raise DatasetInvalid(f"{source}:{number}: a row must be a JSON object, got {type(row).__name__}")
    return rows


def _parse_json(source: str, text: str, whole_first: bool) -> list[tuple[int, object]]:
    if whole_first and text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise DatasetInvalid(f"{source}:{exc.lineno}: invalid JSON ({exc.msg}): fix the file") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DatasetInvalid(f"{source}:{number}: invalid JSON ({exc.msg}): fix or remove the line") from None
    return rows


def detect_format(row: dict, source: str) -> str:
    for column in ("messages", "conversations"):
        turns = row.get(column)
        if isinstance(turns, list):
            return "sharegpt" if turns and isinstance(turns[0], dict) and "from" in turns[0] else "messages"
    if {"instruction", "output"} <= row.keys():
        return "alpaca"
    if {"prompt", "completion"} <= row.keys():
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DatasetInvalid(
        f"{source}: cannot tell the format from the columns {sorted(row)}: expected messages, conversations, "
        "instruction+output, prompt+completion or text; rename the columns or set DATASET_FORMAT"
    )


def _looks_like(row: dict) -> str | None:
    """The format auto-detection would choose for this row, or None when it would choose none."""
    try:
        return detect_format(row, "")
    except DatasetInvalid:
        return None


def _text(row: dict, column: str, required: bool = True) -> str:
    value = row.get(column)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"column {column!r} must be a non-empty string, got {value!r:.60}")
    return value


def _turns(turns, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation must be a non-empty list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise ValueError(f"each turn needs {role_key!r} and a string {content_key!r}, got {turn!r:.80}")
        role = ROLES.get(str(turn.get(role_key)).lower())
        if role is None:
            raise ValueError(f"unknown role {turn.get(role_key)!r}: use system, user or assistant")
        messages.append({"role": role, "content": turn[content_key]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise ValueError("the conversation has no assistant turn to learn from")
    return messages


def to_example(row: dict, fmt: str) -> dict:
    """A row of the given format as {"messages": [...]} or {"prompt", "completion"}; ValueError says what is wrong."""
    if fmt == "alpaca":
        extra = _text(row, "input", required=False)
        user = _text(row, "instruction") + (f"\n\n{extra}" if extra.strip() else "")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return {
            "messages": [
                *system,
                {"role": "user", "content": user},
                {"role": "assistant", "content": _text(row, "output")},
            ]
        }
    if fmt == "sharegpt":
        return {"messages": _turns(row.get("conversations", row.get("messages")), "from", "value")}
    if fmt == "messages":
        return {"messages": _turns(row.get("messages", row.get("conversations")), "role", "content")}
    if fmt == "prompt_completion":
        return {"prompt": _text(row, "prompt", required=False), "completion": _text(row, "completion")}
    return {"prompt": "", "completion": _text(row, "text")}


def load_examples(files: list[tuple[str, Path]], dataset_format: str) -> tuple[list[dict], str]:
    """Every row of every file as an example, and the format; DatasetInvalid names the file and line."""
    examples, fmt = [], None
    for source, path in files:
        rows = read_rows(source, path)
        if fmt is None:
            fmt = detect_format(rows[0][1], source) if dataset_format == "auto" else dataset_format
            log.info("dataset format: %s%s", fmt, " (detected)" if dataset_format == "auto" else "")
        for number, row in rows:
            try:
                examples.append(to_example(row, fmt))
            except ValueError as exc:
                fix = "fix the row"
                if dataset_format != "auto" and number == rows[0][0] and (other := _looks_like(row)) not in (None, fmt):
                    fix = f"these rows look like {other}; unset DATASET_FORMAT or set it to {other}"
                raise DatasetInvalid(f"{source}:{number}: {exc} (format {fmt}): {fix}") from None
    log.info("%d rows from %d file(s)", len(examples), len(files), extra={"fields": {"rows": len(examples)}})
    return examples, fmt


def split(examples: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffled (train, held out); held out is EVAL_FRACTION of the rows, at least one when it is above 0."""
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    held = max(1, round(len(shuffled) * eval_fraction)) if eval_fraction > 0 else 0
    if held >= len(shuffled):
        raise DatasetInvalid(
            f"{len(shuffled)} rows leave none to train on with EVAL_FRACTION={eval_fraction}: lower it"
        )
    return shuffled[held:], shuffled[:held]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises TemplateError, or whatever the template's raise_exception says
        raise ConfigInvalid(
            f"CHAT_TEMPLATE: the chat template cannot render a row ({exc}): set CHAT_TEMPLATE=chatml"
        ) from None


def render(tokenizer, example: dict) -> tuple[str, list[tuple[int, int]]]:
    """The example's text and the character spans of what the model learns to write."""
    if "prompt" in example:
        text = example["prompt"] + example["completion"] + tokenizer.eos_token
        return text, [(len(example["prompt"]), len(text))]
    messages, text, spans = example["messages"], _render(tokenizer, example["messages"]), []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
            end = len(_render(tokenizer, messages[: i + 1]))
            if not text.startswith(_render(tokenizer, messages[: i + 1])):
                raise ConfigInvalid(
                    "CHAT_TEMPLATE: the chat template renders earlier turns differently once later ones follow, "
                    "so assistant turns cannot be located: set CHAT_TEMPLATE=chatml or TRAIN_ON_RESPONSES_ONLY=false"
                )
            spans.append((start, end))
    return text, spans


def bos_of(tokenizer) -> str:
    """The BOS token when the tokenizer itself adds one (texts are tokenized without special tokens), else ''."""
    adds_bos = tokenizer.bos_token is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token if adds_bos else ""


def with_bos(bos: str, text: str) -> str:
    """text starting with bos, unless the template already put it there."""
    return text if text.startswith(bos) else bos + text


def tokenize(tokenizer, examples: list[dict], responses_only: bool):
    """A datasets.Dataset of input_ids and assistant_masks (1 where a token counts in the loss). Large datasets are
    rendered and tokenized in worker processes, one per ROWS_PER_WORKER rows up to the CPU count."""
    from datasets import Dataset

    if not tokenizer.is_fast:
        raise ConfigInvalid("BASE_MODEL: its tokenizer has no fast (Rust) version, which the loss mask needs")
    bos = bos_of(tokenizer)

    def encode(batch):
        texts, all_spans = [], []
        for line in batch["example"]:
            text, spans = render(tokenizer, json.loads(line))
            texts.append(with_bos(bos, text))
            shift = len(texts[-1]) - len(text)
            all_spans.append([(s + shift, e + shift) for s, e in spans] if responses_only else [(0, len(texts[-1]))])
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        masks = [in_spans(offsets, spans) for offsets, spans in zip(encoded["offset_mapping"], all_spans)]
        return {"input_ids": encoded["input_ids"], "assistant_masks": masks}

    workers = min(os.cpu_count() or 1, len(examples) // ROWS_PER_WORKER)
    dataset = Dataset.from_dict({"example": [json.dumps(example) for example in examples]})
    return dataset.map(encode, batched=True, remove_columns=["example"], num_proc=workers if workers > 1 else None,
                       desc="tokenize")  # fmt: skip


def in_spans(offsets: list, spans: list) -> list[int]:
    """1 for each token whose first character lies in one of the spans (in order, not overlapping), else 0: one
    walk over both (a test of every token against every span took 5 of 14 s on 6,000 rows)."""
    mask, i = [], 0
    for start, _ in offsets:
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        mask.append(int(i < len(spans) and spans[i][0] <= start))
    return mask


def check_lengths(dataset, max_seq_length: int) -> dict:
    """How many of tokenize's rows are longer than max_seq_length, and how many keep no trained token once
    cut to it (TRL keeps the start); the tokens of one pass over the rows so cut, and how many of them count in
    the loss. DatasetInvalid when no row keeps a trained token, since training would learn nothing."""
    masks = dataset["assistant_masks"]  # a column read materializes it: once
    # The tokens before a row's first trained one: its prompt, all of the row when nothing in it is trained.
    prompts = [mask.index(1) if 1 in mask else len(mask) for mask in masks]
    lengths = [len(ids) for ids in dataset["input_ids"]]
    truncated = sum(length > max_seq_length for length in lengths)
    no_trained = sum(prompt >= max_seq_length for prompt in prompts)
    if prompts and no_trained == len(prompts):
        raise DatasetInvalid(
            f"all {len(prompts)} rows lose their whole response at MAX_SEQ_LENGTH={max_seq_length} (the shortest "
            f"prompt is {min(prompts)} tokens): raise MAX_SEQ_LENGTH or shorten the prompts"
        )
    if no_trained:
        log.warning("%d of %d rows lose their whole response at MAX_SEQ_LENGTH=%d and teach nothing",
                    no_trained, len(prompts), max_seq_length)  # fmt: skip
    return {"rows": len(prompts), "truncated": truncated, "no_trained_tokens": no_trained,
            "longest": max(lengths, default=0), "tokens": sum(min(length, max_seq_length) for length in lengths),
            "loss_tokens": sum(sum(mask[:max_seq_length]) for mask in masks)}  # fmt: skip


def sample_inputs(tokenizer, examples: list[dict]) -> list[dict]:
    """What the model is asked at sampling time: the rendered input, the prompt as a person reads it, and the
    reference answer (the last assistant turn, or the completion) when known."""
    inputs, bos = [], bos_of(tokenizer)
    for example in examples:
        if "prompt" in example:
            prompt, reference = example["prompt"], example.get("completion")
            if not prompt:  # text rows: ask for the second half given the first
                words = reference.split(" ")
                prompt, reference = " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])
            inputs.append({"input": with_bos(bos, prompt), "prompt": prompt, "reference": reference})
            continue
        messages = example["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        context = messages[:last]
        inputs.append({
            "input": with_bos(bos, _render(tokenizer, context, generation_prompt=True)),
            "prompt": next((m["content"] for m in reversed(context) if m["role"] == "user"), ""),
            "reference": messages[last]["content"] if last < len(messages) else None,
        })  # fmt: skip
    return inputs


def read_sample_prompts(source: str, path: Path, fmt: str) -> list[dict]:
    """SAMPLE_PROMPTS_URI's rows ({"prompt": ...} or {"messages": [...]}, optional "reference") as examples."""
    examples = []
    for number, row in read_rows(source, path):
        if isinstance(row.get("messages"), list):
            examples.append({"messages": row["messages"]})
        elif isinstance(row.get("prompt"), str):
            raw = fmt in ("text", "prompt_completion")
            examples.append(
                {"prompt": row["prompt"], "completion": row.get("reference") or ""}
                if raw
                else {"messages": [{"role": "user", "content": row["prompt"]}]}
            )
        else:
            raise DatasetInvalid(f"{source}:{number}: a sample prompt needs a string 'prompt' or a 'messages' list")
        if row.get("reference") and "messages" in examples[-1]:
            examples[-1]["messages"].append({"role": "assistant", "content": row["reference"]})
    return examples
