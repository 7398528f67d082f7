"""Rows in, token ids and loss masks out.

Every format becomes one of two shapes: a chat ({"messages": [...]}, from alpaca, sharegpt and
messages rows), rendered with the chat template, or raw text ({"prompt", "completion"}, from
prompt_completion and text rows), used as written with EOS appended. The loss mask covers what the
model must learn to write: assistant turns and completions (all tokens when
TRAIN_ON_RESPONSES_ONLY is false). TRL's SFTTrainer takes the token ids and masks as they are and
builds labels, truncates and packs them.

No stage holds the rows as Python objects: they stream from the files into Arrow files on the scratch volume
(build_rows), and are tokenized from there into Arrow files beside them (tokenize_split), once per run; training
memory-maps both.
"""

import bisect
import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from job.errors import ConfigInvalid, DatasetInvalid
from job.storage import describe_file

log = logging.getLogger(__name__)

# Rendering (the chat template) and tokenizing take 0.2 to 0.5 ms a row a core (docs/benchmarks.md); a worker
# process costs about a second.
ROWS_PER_WORKER = 2000
# Labelling and packing (pack) take about 50 us a row. TRL packs each worker's share of the rows apart (best fit in
# batches of 1,000), so the packs change with the worker count: it is fixed by the rows alone, never by the machine,
# and an attempt resumed on another node trains the same sequences in the same order.
PACKING_ROWS_PER_WORKER = 20_000
PACKING_WORKERS = 8
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "quota period", or "max period" without a CPU limit
# A dry run tokenizes this many training rows, drawn at random: its steps' rows, and the sample that its length
# counts are estimated from; and at most DRY_RUN_EVAL_ROWS held-out rows (each evaluation reads them all).
DRY_RUN_ROWS = 2000
DRY_RUN_EVAL_ROWS = 20
CHUNK_ROWS = 10_000  # rows read at a time from CSV and Parquet files
CHATS = ("alpaca", "sharegpt", "messages")  # the formats whose rows become chats; the others raw text
ROWS_INFO, TOKENS_INFO = "rows.json", "tokens.json"  # written last: their folder is complete exactly when they exist
NOT_FAST = "BASE_MODEL: its tokenizer has no fast (Rust) version, which the loss mask needs"
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def read_rows(source: str, path: Path) -> list[tuple[int, dict]]:
    """Every row of a small file (SAMPLE_PROMPTS_URI's) at once, as stream_rows reads them."""
    rows = list(stream_rows(source, path))
    if not rows:
        raise DatasetInvalid(f"{source}: no rows: remove the file or fill it")
    return rows


def stream_rows(source: str, path: Path) -> Iterator[tuple[int, dict]]:
    """(line or row number, row) for each row of a .jsonl, .json, .csv or .parquet file, optionally .gz, read as they
    come: JSON lines one at a time, CSV and Parquet CHUNK_ROWS at a time. A .json file holding one array is read
    whole (a large dataset belongs in JSON lines or Parquet)."""
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            rows = _parquet_rows(path)
        elif name.endswith(".csv"):
            rows = _csv_rows(path)
        else:
            rows = _json_rows(source, path, name.endswith(".json"))
        for number, row in rows:
            if not isinstance(row, dict):
                raise DatasetInvalid(f"{source}:{number}: a row must be a JSON object, got {type(row).__name__}")
            yield number, row
    except DatasetInvalid:
        raise
    except UnicodeDecodeError:
        raise DatasetInvalid(f"{source}: not UTF-8 text: re-encode the file as UTF-8") from None
    except Exception as exc:  # pandas, pyarrow and gzip each raise their own kinds for a bad file
        raise DatasetInvalid(f"{source}: cannot be read ({type(exc).__name__}: {exc}): check the file") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        yield from enumerate((row for batch in file.iter_batches(CHUNK_ROWS) for row in batch.to_pylist()), 1)


def _csv_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pandas as pd

    with pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", chunksize=CHUNK_ROWS) as chunks:
        yield from enumerate((row for chunk in chunks for row in chunk.to_dict("records")), 2)  # line 1: the header


def _json_rows(source: str, path: Path, whole_first: bool) -> Iterator[tuple[int, object]]:
    # utf-8-sig: a byte-order mark (Excel, Windows editors) is dropped, not read as part of the first row
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8-sig") as f:
        if whole_first and _holds_array(f):
            try:
                yield from enumerate(json.loads(f.read()), 1)
            except json.JSONDecodeError as exc:
                raise DatasetInvalid(f"{source}:{exc.lineno}: invalid JSON ({exc.msg}): fix the file") from None
            return
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetInvalid(f"{source}:{number}: invalid JSON ({exc.msg}): fix or remove the line") from None
            yield number, row


def _holds_array(f) -> bool:
    """Whether the text file's first character other than white space opens an array; f is left at its start."""
    while (char := f.read(1)).isspace():
        pass
    f.seek(0)
    return char == "["


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
        system = _text(row, "system", required=False)  # a string: the rows' Arrow columns have one type each
        system = [{"role": "system", "content": system}] if system else []
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
    """Every row of every file as an example, in memory, and the format: for small datasets (tests, benchmarks); the
    job writes them to Arrow (build_rows). DatasetInvalid names the file and line."""
    fmt = format_of(files, dataset_format)
    return list(examples(files, fmt, dataset_format)), fmt


def format_of(files: list[tuple[str, Path]], dataset_format: str) -> str:
    """DATASET_FORMAT, or when it is auto the format of the first file's first row."""
    if dataset_format != "auto":
        return dataset_format
    source, path = files[0]
    first = next(stream_rows(source, path), None)
    if first is None:
        raise DatasetInvalid(f"{source}: no rows: remove the file or fill it")
    return detect_format(first[1], source)


def examples(files: list[tuple[str, Path]], fmt: str, dataset_format: str) -> Iterator[dict]:
    """Every row of every file as an example of the format, as they are read; DatasetInvalid names the file and
    line of the first bad row."""
    for source, path in files:
        first = None
        for number, row in stream_rows(source, path):
            first = first or number
            try:
                example = to_example(row, fmt)
            except ValueError as exc:
                fix = "fix the row"
                if dataset_format != "auto" and number == first and (other := _looks_like(row)) not in (None, fmt):
                    fix = f"these rows look like {other}; unset DATASET_FORMAT or set it to {other}"
                raise DatasetInvalid(f"{source}:{number}: {exc} (format {fmt}): {fix}") from None
            yield example
        if first is None:
            raise DatasetInvalid(f"{source}: no rows: remove the file or fill it")


def features(fmt: str):
    """The Arrow columns of a format's examples: a chat's turns, or the prompt and completion of raw text."""
    from datasets import Features, List, Value

    if fmt in CHATS:
        return Features({"messages": List({"role": Value("string"), "content": Value("string")})})
    return Features({"prompt": Value("string"), "completion": Value("string")})


def digest(value) -> str:
    """A short name for what value holds (JSON): the scratch folders of rows and tokens are named by it."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rows_folder(scratch: Path, listing: list[dict], dataset_format: str) -> Path:
    """Where the rows of the dataset that storage.identify listed are kept under the run's scratch folder."""
    return scratch / "data" / f"rows-{digest([listing, dataset_format])}"


def build_rows(files: list[tuple[str, Path]], dataset_format: str, folder: Path) -> None:
    """Every row of every file, validated and normalized (examples), into Arrow files under folder, and then
    rows.json: the format, the count, the files' sizes and sha256, and the Arrow files. DatasetInvalid names the
    file and line of the first bad row."""
    # datasets' generator builder holds 1,000 rows at a time and writes the rest to disk; read back, they are
    # memory-mapped. Measured on 300,000 Alpaca-like rows (318 MB of JSON lines, 2 cores): 5.3 s at 0.19 GB peak
    # RSS, against 1.5 s for datasets' JSON builder (pyarrow's reader), which would still need this validation
    # pass, knows no line numbers, and stops at a column of mixed types with its own schema error.
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    for old in folder.parent.glob("rows-*"):  # this folder's unfinished build, or another dataset's rows
        shutil.rmtree(old)
    fmt = format_of(files, dataset_format)
    log.info("dataset format: %s%s", fmt, " (detected)" if dataset_format == "auto" else "")
    try:
        rows = Dataset.from_generator(
            examples,
            features=features(fmt),
            cache_dir=str(folder),
            fingerprint=folder.name,
            gen_kwargs={"files": files, "fmt": fmt, "dataset_format": dataset_format},
        )
    except DatasetGenerationError as exc:  # what the generator raised, wrapped
        if isinstance(exc.__cause__, DatasetInvalid):
            raise exc.__cause__ from None
        raise
    described = [describe_file(path, source) for source, path in files]
    info = {"format": fmt, "rows": len(rows), "files": described, "arrow": _arrow_files(rows, folder)}
    (folder / ROWS_INFO).write_text(json.dumps(info, indent=1))
    log.info("%d rows from %d file(s)", len(rows), len(files), extra={"fields": {"rows": len(rows)}})


def rows_built(folder: Path) -> bool:
    return (folder / ROWS_INFO).is_file()


def open_rows(folder: Path) -> tuple[object, dict]:
    """The rows that build_rows wrote, memory-mapped, and its rows.json."""
    info = json.loads((folder / ROWS_INFO).read_text())
    return _open(folder, info["arrow"]), info


def _arrow_files(dataset, folder: Path) -> list[str]:
    return [str(Path(f["filename"]).relative_to(folder)) for f in dataset.cache_files]


def _open(folder: Path, names: list[str]):
    """The Arrow files as one dataset; its fingerprint follows from their paths and times, the same in every attempt,
    so that TRL's maps of it find their cached results."""
    from datasets import Dataset, concatenate_datasets

    return concatenate_datasets([Dataset.from_file(str(folder / name)) for name in names])


def split(count: int, eval_fraction: float, seed: int) -> tuple:
    """The indices of count rows shuffled by seed (numpy arrays), as (train, held out); held out is EVAL_FRACTION of
    the rows, at least one when it is above 0."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(count * eval_fraction)) if eval_fraction > 0 else 0
    if held >= count:
        raise DatasetInvalid(f"{count} rows leave none to train on with EVAL_FRACTION={eval_fraction}: lower it")
    return order[held:], order[:held]


OTHER_TEMPLATE = "set CHAT_TEMPLATE to the model's family (llama3, qwen3, gemma3, mistral, phi4, gptoss) or chatml"
UNSPLIT = (
    "CHAT_TEMPLATE: the chat template renders earlier turns differently once later ones follow, so assistant turns "
    f"cannot be located: {OTHER_TEMPLATE}, or TRAIN_ON_RESPONSES_ONLY=false"
)


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False, template: str | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises TemplateError, or whatever the template's raise_exception says
        raise ConfigInvalid(f"CHAT_TEMPLATE: the chat template cannot render a row ({exc}): {OTHER_TEMPLATE}") from None


def render(tokenizer, example: dict) -> tuple[str, list[tuple[int, int]]]:
    """The example's text and the character spans of what the model learns to write: each assistant turn from the end
    of the generation prompt before it to the end of the turn (its end-of-turn token, and the newline after it where
    the template writes one), found by rendering the chat up to each turn. A template that renders an answer otherwise
    once later turns follow (Qwen3 gives the last answer alone an empty think block; gpt-oss ends the last answer with
    <|return|>, earlier ones with <|end|>) renders the chat with TRL's training variant of it instead, whose
    {% generation %} markers end each turn: every Qwen3 answer then starts with its think block, as Qwen3 writes one
    after the generation prompt."""
    if "prompt" in example:
        text = example["prompt"] + example["completion"] + tokenizer.eos_token
        return text, [(len(example["prompt"]), len(text))]
    messages = example["messages"]
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    text = _render(tokenizer, messages)
    upto = [text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1]) for i in turns]
    if all(text.startswith(chat) for chat in upto):
        return text, [(_prompt_end(tokenizer, messages[:i], text), len(chat)) for i, chat in zip(turns, upto)]
    template = _training_template(tokenizer, tokenizer.chat_template)
    text, marked = _render_marked(tokenizer, messages, template)
    if len(marked) != len(turns):
        raise ConfigInvalid(UNSPLIT)
    # The markers of gpt-oss's wrap the turn's header too: what the model writes starts after the generation prompt.
    return text, [(max(start, _prompt_end(tokenizer, messages[:i], text, template)), end)
                  for i, (start, end) in zip(turns, marked)]  # fmt: skip


def _prompt_end(tokenizer, context: list[dict], text: str, template: str | None = None) -> int:
    """Where the answer after context starts in text: the end of context rendered with the generation prompt."""
    prompt = _render(tokenizer, context, generation_prompt=True, template=template) if context else ""
    if not text.startswith(prompt):
        raise ConfigInvalid(UNSPLIT)
    return len(prompt)


@functools.lru_cache(maxsize=4)  # TRL probes the template with tool calls first: 1 ms a row, 10 times the rendering
def _training_template(tokenizer, template: str) -> str:
    """TRL's training variant of the tokenizer's template (prefix-preserving, {% generation %} around each answer), or
    the template itself when it has those markers; ConfigInvalid when neither."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    try:
        template = get_training_chat_template(tokenizer) or template
    except ValueError:  # a template that TRL does not know
        raise ConfigInvalid(UNSPLIT) from None
    if not has_generation_markers(template):
        raise ConfigInvalid(UNSPLIT)
    return template


def _render_marked(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered with template, and the character spans of its {% generation %} blocks."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        [text], [marked] = render_jinja_template(
            [messages], chat_template=template, return_assistant_tokens_mask=True, **tokenizer.special_tokens_map
        )
    except Exception as exc:  # as in _render
        raise ConfigInvalid(f"CHAT_TEMPLATE: the chat template cannot render a row ({exc}): {OTHER_TEMPLATE}") from None
    return text, marked


def bos_of(tokenizer) -> str:
    """The BOS token when the tokenizer itself adds one (texts are tokenized without special tokens), else ''."""
    adds_bos = tokenizer.bos_token is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return tokenizer.bos_token if adds_bos else ""


def with_bos(bos: str, text: str) -> str:
    """text starting with bos, unless the template already put it there."""
    return text if text.startswith(bos) else bos + text


def tokenize(tokenizer, rows, responses_only: bool, cache_file: Path | None = None, most: int | None = None):
    """A datasets.Dataset of input_ids and assistant_masks (1 where a token counts in the loss) for rows: a
    datasets.Dataset of examples (the job's, memory-mapped), or a list of them. Written to cache_file when given (one
    file per worker: cache_file's name with _0000N_of_0000M). Large datasets are rendered and tokenized in worker
    processes, one per ROWS_PER_WORKER rows up to the cores this process may use and most (DATA_WORKERS)."""
    from datasets import Dataset, Features, List, Value

    if not tokenizer.is_fast:
        raise ConfigInvalid(NOT_FAST)
    bos = bos_of(tokenizer)

    def encode(batch):
        texts, all_spans = [], []
        for values in zip(*batch.values()):
            text, spans = render(tokenizer, dict(zip(batch, values)))
            texts.append(with_bos(bos, text))
            shift = len(texts[-1]) - len(text)
            all_spans.append([(s + shift, e + shift) for s, e in spans] if responses_only else [(0, len(texts[-1]))])
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                            return_token_type_ids=False)  # fmt: skip
        masks = [in_spans(offsets, spans) for offsets, spans in zip(encoded["offset_mapping"], all_spans)]
        return {"input_ids": encoded["input_ids"], "assistant_masks": masks}

    rows = Dataset.from_list(rows) if isinstance(rows, list) else rows
    # int32 ids and int8 masks: 5 bytes a token on disk, against 16 as Python's ints would have them.
    tokens = Features({"input_ids": List(Value("int32")), "assistant_masks": List(Value("int8"))})
    return rows.map(encode, batched=True, remove_columns=rows.column_names, num_proc=workers(len(rows), cores(most)),
                    features=tokens, cache_file_name=cache_file and str(cache_file),
                    new_fingerprint=cache_file and digest(str(cache_file)), desc="tokenize")  # fmt: skip


def workers(rows: int, most: int, per: int = ROWS_PER_WORKER) -> int | None:
    """The processes a map over rows takes (datasets' num_proc): one per `per` rows, up to most; None (this process)
    for one."""
    count = min(most, rows // per)
    return count if count > 1 else None


def cores(most: int | None = None) -> int:
    """The CPUs this process may run on (its affinity: a pod's CPUs under the static CPU manager), capped by its
    cgroup's CPU quota (a pod's CPU limit) and by most (DATA_WORKERS: the pod's CPU request in k8s/base). Without a
    limit a pod's affinity is every core of the node."""
    count = len(os.sched_getaffinity(0))
    count = min(count, most) if most else count
    try:
        quota, period = CPU_MAX.read_text().split()
    except (OSError, ValueError):  # cgroup v1, or none
        return count
    return count if quota == "max" else max(1, min(count, int(quota) // int(period)))


def in_spans(offsets: list, spans: list) -> list[int]:
    """1 for each token whose first character lies in one of the spans, else 0; offsets in order, as the tokenizer
    gives them: a bisection per span (a walk over every token took a quarter of the data stage)."""
    starts = [start for start, _ in offsets]
    mask = [0] * len(starts)
    for start, end in spans:
        first, last = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)
        mask[first:last] = [1] * (last - first)
    return mask


def check_lengths(dataset, max_seq_length: int) -> dict:
    """How many of tokenize's rows are longer than max_seq_length, and how many keep no trained token once
    cut to it (TRL keeps the start); the tokens of one pass over the rows so cut, and how many of them count in
    the loss. DatasetInvalid when no row keeps a trained token, since training would learn nothing. Reads the
    columns CHUNK_ROWS rows at a time, as Arrow arrays: 0.5 s for 20,000 rows, where a walk over them as Python
    lists took 11.4 s."""
    import numpy as np
    import pyarrow.compute as pc

    lengths, prompts, loss_tokens = [np.zeros(0, int)], [np.zeros(0, int)], 0
    for batch in dataset.with_format("arrow").iter(batch_size=CHUNK_ROWS):
        masks = batch["assistant_masks"].combine_chunks()
        starts = masks.offsets.to_numpy()
        starts, ends = starts[:-1] - starts[0], starts[1:] - starts[0]
        ones = np.append(np.flatnonzero(masks.flatten().to_numpy()), ends[-1] if len(ends) else 0)  # and a stop
        # The tokens before a row's first trained one: its prompt, all of the row when nothing in it is trained.
        prompts.append(np.minimum(ones[np.searchsorted(ones, starts)], ends) - starts)
        row_starts = starts[np.searchsorted(starts, ones[:-1], side="right") - 1]
        loss_tokens += int(np.count_nonzero(ones[:-1] - row_starts < max_seq_length))
        lengths.append(pc.list_value_length(batch["input_ids"]).to_numpy())
    lengths, prompts = np.concatenate(lengths), np.concatenate(prompts)
    truncated = int(np.count_nonzero(lengths > max_seq_length))
    no_trained = int(np.count_nonzero(prompts >= max_seq_length))
    if len(prompts) and no_trained == len(prompts):
        raise DatasetInvalid(
            f"all {len(prompts)} rows lose their whole response at MAX_SEQ_LENGTH={max_seq_length} (the shortest "
            f"prompt is {prompts.min()} tokens): raise MAX_SEQ_LENGTH or shorten the prompts"
        )
    if no_trained:
        log.warning("%d of %d rows lose their whole response at MAX_SEQ_LENGTH=%d and teach nothing",
                    no_trained, len(prompts), max_seq_length)  # fmt: skip
    return {"rows": len(prompts), "truncated": truncated, "no_trained_tokens": no_trained,
            "longest": int(lengths.max(initial=0)), "tokens": int(np.minimum(lengths, max_seq_length).sum()),
            "loss_tokens": loss_tokens}  # fmt: skip


def estimate(lengths: dict, rows: int) -> dict:
    """check_lengths of a sample as estimates for rows rows: its counts scaled, and the sample's size as
    estimated_from."""
    share = rows / lengths["rows"]
    scaled = {key: round(lengths[key] * share) for key in ("truncated", "no_trained_tokens", "tokens", "loss_tokens")}
    return lengths | scaled | {"rows": rows, "estimated_from": lengths["rows"]}


def tokens_folder(rows: Path, tokenizer, *settings) -> Path:
    """Where the tokenized rows are kept beside the rows they come from: named by those rows, the tokenizer (its
    whole definition: vocabulary, merges, normalizer, added and special tokens) with its chat template, and the
    settings that change the tokens or their counts."""
    if not tokenizer.is_fast:
        raise ConfigInvalid(NOT_FAST)
    definition = [tokenizer.backend_tokenizer.to_str(), tokenizer.special_tokens_map, tokenizer.chat_template]
    return rows.parent / f"tokens-{digest([rows.name, digest(definition), *settings])}"


def tokenize_split(tokenizer, rows, train, held, responses_only: bool, max_seq_length: int, folder: Path,
                   most: int | None = None, packing: bool = False) -> None:  # fmt: skip
    """The training and held-out rows (indices into rows) tokenized into folder, the training rows' lengths checked,
    both packed when packing (pack), and tokens.json written last; nothing when an earlier attempt did it."""
    if (folder / TOKENS_INFO).is_file():
        log.info("data: reusing the tokenized rows of an earlier attempt from %s", folder)
        return
    for old in folder.parent.glob("tokens-*"):  # this folder's unfinished build, or another tokenizer's tokens
        shutil.rmtree(old)
    count = workers(len(train), cores(most)) or 1
    log.info("data: tokenizing %d rows in %d process%s", len(train) + len(held), count, "es" if count > 1 else "",
             extra={"fields": {"tokenizing_workers": count}})  # fmt: skip
    train_ds = tokenize(tokenizer, rows.select(train), responses_only, folder / "train.arrow", most)
    lengths = check_lengths(train_ds, max_seq_length)
    eval_ds = tokenize(tokenizer, rows.select(held), responses_only, folder / "eval.arrow", most) if len(held) else None
    if packing:  # the packed copies replace the tokens on the scratch volume
        unpacked = [train_ds, eval_ds]
        train_ds = pack(train_ds, max_seq_length, folder / "train-packed.arrow")
        eval_ds = eval_ds and pack(eval_ds, max_seq_length, folder / "eval-packed.arrow")
        for dataset in filter(None, unpacked):
            _remove_files(dataset)
        log.info("data: %d training rows packed into %d sequences of up to %d tokens", len(train), len(train_ds),
                 max_seq_length, extra={"fields": {"packed_sequences": len(train_ds)}})  # fmt: skip
    info = {"train": _arrow_files(train_ds, folder), "eval": eval_ds and _arrow_files(eval_ds, folder),
            "lengths": lengths}  # fmt: skip
    (folder / TOKENS_INFO).write_text(json.dumps(info, indent=1))


def pack(dataset, max_seq_length: int, cache_file: Path | None = None):
    """The tokenized rows as the trainer takes them packed: input_ids and labels (the id where the token counts in the
    loss, else -100) of the rows that keep a trained token once cut to max_seq_length, in TRL's best-fit-decreasing
    bins of up to max_seq_length tokens, each with its rows' seq_lengths (TRL's padding-free collator restarts
    position_ids at each row). TRL packs each batch of 1,000 rows of each worker's share apart, so the workers are
    fixed by the row count (PACKING_ROWS_PER_WORKER), never by the machine: an attempt resumed on a node of other
    cores trains the same sequences. Written to cache_file when given."""
    from trl.data_utils import pack_dataset

    count = workers(len(dataset), PACKING_WORKERS, PACKING_ROWS_PER_WORKER)

    def where(suffix: str) -> dict:
        path = cache_file and cache_file.with_name(cache_file.stem + suffix + cache_file.suffix)
        return {"cache_file_name": path and str(path), "new_fingerprint": path and digest(str(path))}

    labelled = dataset.with_format("arrow").map(
        _labels, batched=True, fn_kwargs={"max_seq_length": max_seq_length}, remove_columns=dataset.column_names,
        num_proc=count, desc="labels", **where("_labels"),
    )  # fmt: skip
    packed = pack_dataset(labelled.with_format(None), max_seq_length, "bfd", {"num_proc": count, **where("")})
    _remove_files(labelled)
    return packed


def _labels(batch, max_seq_length: int):
    """A batch of tokenized rows (a pyarrow Table) as input_ids and labels, less the rows without a trained token in
    their first max_seq_length (TRL's packing keeps each row's start): the loss would have nothing of them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    ids, masks = batch["input_ids"].combine_chunks(), batch["assistant_masks"].combine_chunks()
    kept = pc.list_slice(masks, 0, max_seq_length)
    trained = np.bincount(pc.list_parent_indices(kept).to_numpy(), pc.list_flatten(kept).to_numpy(), len(kept)) > 0
    values = pc.if_else(pc.equal(pc.list_flatten(masks), 1), pc.list_flatten(ids), pa.scalar(-100, pa.int32()))
    labels = pa.ListArray.from_arrays(pc.subtract(ids.offsets, ids.offsets[0]), values)
    return pa.table({"input_ids": ids, "labels": labels}).filter(pa.array(trained))


def _remove_files(dataset) -> None:
    """Deletes the Arrow files behind a dataset that nothing reads any more (a mapped file stays readable)."""
    for file in dataset.cache_files:
        Path(file["filename"]).unlink(missing_ok=True)


def is_packed(dataset) -> bool:
    """Whether the dataset is pack's: sequences of several rows, each with its rows' seq_lengths."""
    return "seq_lengths" in dataset.column_names


def row_count(dataset) -> int:
    """The tokenized rows in the dataset: packed ones counted one by one."""
    import pyarrow.compute as pc

    if not is_packed(dataset):
        return len(dataset)
    return pc.sum(pc.list_value_length(dataset.data.column("seq_lengths"))).as_py() or 0


def open_tokens(folder: Path) -> tuple[object, object | None, dict]:
    """What tokenize_split wrote, memory-mapped: the training rows, the held-out rows (None when there are none),
    and the training rows' check_lengths."""
    info = json.loads((folder / TOKENS_INFO).read_text())
    return _open(folder, info["train"]), info["eval"] and _open(folder, info["eval"]), info["lengths"]


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
