import gzip
import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from job import data, templates
from job.errors import ConfigInvalid, DatasetInvalid
from job.model import train_tokenizer

ROWS = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello!"}]},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "prompt_completion": {"prompt": "The capital of France is", "completion": " Paris."},
    "text": {"text": "Once upon a time there was a tiny model."},
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    texts = [
        {"prompt": "", "completion": "the quick brown fox jumps over the lazy dog " * 3 + str(i)} for i in range(50)
    ]
    tok = train_tokenizer(texts, vocab_size=300)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.mark.parametrize("fmt", list(ROWS))
def test_format_is_detected_from_the_columns(fmt):
    assert data.detect_format(ROWS[fmt], "f.jsonl") == fmt


def test_messages_under_conversations_and_sharegpt_under_messages_are_told_apart():
    assert data.detect_format({"conversations": ROWS["messages"]["messages"]}, "f") == "messages"
    assert data.detect_format({"messages": ROWS["sharegpt"]["conversations"]}, "f") == "sharegpt"


def test_unknown_columns_say_what_is_expected():
    with pytest.raises(DatasetInvalid, match=r"f.jsonl: cannot tell the format from the columns \['question'\].*"):
        data.detect_format({"question": "?"}, "f.jsonl")


def test_sharegpt_keeps_system_turns_and_maps_roles():
    example = data.to_example(ROWS["sharegpt"], "sharegpt")
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]


def test_alpaca_joins_instruction_and_input():
    example = data.to_example(ROWS["alpaca"], "alpaca")
    assert example["messages"][0]["content"] == "Add the numbers.\n\n2 + 3"
    assert example["messages"][1] == {"role": "assistant", "content": "5"}


@pytest.mark.parametrize(
    ("row", "fmt", "problem"),
    [({"instruction": "x", "output": ""}, "alpaca", "'output' must be a non-empty string"),
     ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
     ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "unknown role 'robot'"),
     ({"text": 3}, "text", "'text' must be a non-empty string")],
)  # fmt: skip
def test_bad_rows_say_what_is_wrong(row, fmt, problem):
    with pytest.raises(ValueError, match=problem):
        data.to_example(row, fmt)


def write_all_kinds(folder, rows):
    """The same rows as .jsonl, .json array, .json lines, .csv, .parquet and gzip-compressed variants."""
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "a.jsonl").write_text(lines)
    (folder / "b.json").write_text(json.dumps(rows))
    (folder / "c.json").write_text(lines)
    pd.DataFrame(rows).to_csv(folder / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(folder / "e.parquet")
    (folder / "f.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (folder / "g.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    pd.DataFrame(rows).to_csv(folder / "h.csv.gz", index=False)
    return sorted(folder.iterdir())


def test_every_file_kind_reads_the_same_rows(tmp_path):
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(3)]
    for path in write_all_kinds(tmp_path, rows):
        assert [row for _, row in data.read_rows(str(path), path)] == rows, path.name


@pytest.mark.parametrize("name", ["a.jsonl", "b.json", "c.json", "d.csv", "f.jsonl.gz", "g.json.gz", "h.csv.gz"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, name):
    """Excel's "CSV UTF-8" and Windows editors start files with one."""
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(3)]
    plain = next(p for p in write_all_kinds(tmp_path, rows) if p.name == name)
    with_bom = tmp_path / "bom" / name
    with_bom.parent.mkdir()
    text = (gzip.decompress if name.endswith(".gz") else bytes)(plain.read_bytes())
    bom = b"\xef\xbb\xbf" + text
    with_bom.write_bytes(gzip.compress(bom) if name.endswith(".gz") else bom)
    assert [row for _, row in data.read_rows(str(with_bom), with_bom)] == rows


def test_nested_columns_survive_parquet(tmp_path):
    pd.DataFrame([ROWS["messages"]] * 2).to_parquet(tmp_path / "chat.parquet")
    examples, fmt = data.load_examples([("s3://b/chat.parquet", tmp_path / "chat.parquet")], "auto")
    assert fmt == "messages" and examples[0]["messages"][1]["content"] == "Hello!"


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [("bad.jsonl", '{"text": "ok"}\n{"text": broken}\n', r"s3://b/bad.jsonl:2: invalid JSON"),
     ("bad.json", '[{"text": "ok"},\n{"text": }]', r"s3://b/bad.json:2: invalid JSON"),
     ("empty.jsonl", "\n\n", "no rows"),
     ("list.jsonl", "[1, 2]\n", r"s3://b/list.jsonl:1: a row must be a JSON object")],
)  # fmt: skip
def test_invalid_files_name_the_file_and_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetInvalid, match=problem):
        data.read_rows(f"s3://b/{name}", path)


def test_undecodable_files_are_invalid(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    for path in tmp_path.iterdir():
        with pytest.raises(DatasetInvalid, match=path.name):
            data.read_rows(path.name, path)


def test_a_bad_row_names_file_line_and_format(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS["alpaca"]) + "\n" + json.dumps({"instruction": "x", "output": 4}) + "\n")
    with pytest.raises(DatasetInvalid, match=r"d.jsonl:2: column 'output' .* \(format alpaca\)"):
        data.load_examples([("d.jsonl", path)], "auto")


def test_a_forced_format_that_fails_on_rows_of_another_says_which(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(ROWS["sharegpt"]) + "\n")
    with pytest.raises(DatasetInvalid) as error:
        data.load_examples([("s3://b/chats.jsonl", path)], "alpaca")
    assert str(error.value) == (
        "s3://b/chats.jsonl:1: column 'instruction' must be a non-empty string, got None (format alpaca): these rows "
        "look like sharegpt; unset DATASET_FORMAT or set it to sharegpt"
    )
    # Rows of the forced format with a bad value, or of no format at all, get no hint: the row is to be fixed.
    for row in ({"instruction": "x", "output": ""}, {"question": "?"}):
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DatasetInvalid, match=r"chats.jsonl:1: .* \(format alpaca\): fix the row$"):
            data.load_examples([("chats.jsonl", path)], "alpaca")


@pytest.mark.parametrize(
    ("content", "problem"),
    [('{"text": "ok"}\n\n{"text": broken}\n', r"b.jsonl:3: invalid JSON .*: fix or remove the line$"),
     ('{"text": "ok"}\n{"text": 4}\n', r"b.jsonl:2: column 'text' must be a non-empty string, got 4 \(format text\)"),
     ('{"text": "ok"}\n[1]\n', r"b.jsonl:2: a row must be a JSON object, got list"),
     ("\n", r"b.jsonl: no rows: remove the file or fill it")],
)  # fmt: skip
def test_rows_streamed_into_arrow_name_the_file_and_line_of_a_bad_row(tmp_path, content, problem):
    """The job's path: datasets' generator builder wraps what the rows' reader raises; the job's own error comes out,
    and the folder is not taken as built."""
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS["text"]) + "\n")
    (tmp_path / "b.jsonl").write_text(content)
    files = [(f"s3://b/{name}", tmp_path / name) for name in ("a.jsonl", "b.jsonl")]
    folder = tmp_path / "data" / "rows-x"
    with pytest.raises(DatasetInvalid, match=problem):
        data.build_rows(files, "auto", folder)
    assert not data.rows_built(folder)


def test_rows_are_written_to_arrow_once_and_read_back(tmp_path):
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i), "system": "Be brief." if i % 2 else ""}
            for i in range(30)]  # fmt: skip
    pd.DataFrame(rows[:10]).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows[10:]).encode()))
    files = [(f"s3://b/{p.name}", p) for p in (tmp_path / "a.parquet", tmp_path / "b.jsonl.gz")]
    folder = data.rows_folder(tmp_path / "run", [{"uri": "s3://b/", "etag": "1"}], "auto")
    stale = data.rows_folder(tmp_path / "run", [{"uri": "s3://b/", "etag": "0"}], "auto")  # the dataset before
    stale.mkdir(parents=True)
    data.build_rows(files, "auto", folder)
    assert data.rows_built(folder) and not stale.exists()
    arrow, info = data.open_rows(folder)
    assert arrow.to_list() == data.load_examples(files, "auto")[0] and len(arrow) == 30
    assert arrow.cache_files and all(str(f["filename"]).startswith(str(folder)) for f in arrow.cache_files)
    assert info["format"] == "alpaca" and info["rows"] == 30
    assert [f["path"] for f in info["files"]] == ["s3://b/a.parquet", "s3://b/b.jsonl.gz"]
    assert info["files"][1]["sha256"] == hashlib.sha256((tmp_path / "b.jsonl.gz").read_bytes()).hexdigest()
    assert arrow[1]["messages"][0] == {"role": "system", "content": "Be brief."} and len(arrow[0]["messages"]) == 2


def test_tokenized_rows_are_kept_under_a_key_of_what_changes_them_and_reused(tokenizer, tmp_path, caplog):
    tokenizer.chat_template = templates.TEMPLATES["alpaca"]
    files = [("d.jsonl", tmp_path / "d.jsonl")]
    files[0][1].write_text("".join(json.dumps(ROWS["alpaca"] | {"input": str(i)}) + "\n" for i in range(12)))
    rows_folder = tmp_path / "data" / "rows-x"
    data.build_rows(files, "auto", rows_folder)
    rows, _ = data.open_rows(rows_folder)
    folder = data.tokens_folder(rows_folder, tokenizer, True, 2048)
    assert folder == data.tokens_folder(rows_folder, tokenizer, True, 2048)
    assert folder != data.tokens_folder(rows_folder, tokenizer, False, 2048)
    train, held = data.split(len(rows), 0.25, seed=1)
    data.tokenize_split(tokenizer, rows, train, held, True, 2048, folder)
    train_ds, eval_ds, lengths = data.open_tokens(folder)
    assert (len(train_ds), len(eval_ds)) == (9, 3) and lengths == data.check_lengths(train_ds, 2048)
    assert train_ds[0] == data.tokenize(tokenizer, [rows[int(train[0])]], True)[0]
    written = (folder / data.TOKENS_INFO).stat().st_mtime_ns
    with caplog.at_level("INFO"):
        data.tokenize_split(tokenizer, rows, train, held, True, 2048, folder)
    assert f"data: reusing the tokenized rows of an earlier attempt from {folder}" in caplog.messages
    assert (folder / data.TOKENS_INFO).stat().st_mtime_ns == written
    tokenizer.chat_template = templates.TEMPLATES["chatml"]
    other = data.tokens_folder(rows_folder, tokenizer, True, 2048)
    assert other != folder
    data.tokenize_split(tokenizer, rows, train, held[:0], True, 2048, other)
    assert data.open_tokens(other)[1] is None and not folder.exists(), "one tokenized set per run is kept"


def test_a_samples_counts_are_scaled_to_the_rows_it_was_drawn_from():
    sample = {"rows": 2000, "truncated": 3, "no_trained_tokens": 1, "longest": 900, "tokens": 400_000,
              "loss_tokens": 100_000}  # fmt: skip
    assert data.estimate(sample, 300_000) == {"rows": 300_000, "truncated": 450, "no_trained_tokens": 150,
                                              "longest": 900, "tokens": 60_000_000, "loss_tokens": 15_000_000,
                                              "estimated_from": 2000}  # fmt: skip


def masked_text(tokenizer, dataset, i=0):
    ids, mask = dataset[i]["input_ids"], dataset[i]["assistant_masks"]
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


def test_only_responses_count_in_the_loss(tokenizer):
    tokenizer.chat_template = templates.TEMPLATES["alpaca"]
    examples = [data.to_example(ROWS["alpaca"], "alpaca")]
    trained = masked_text(tokenizer, data.tokenize(tokenizer, examples, responses_only=True))
    assert trained.startswith("5</s>") and "Add" not in trained
    everything = masked_text(tokenizer, data.tokenize(tokenizer, examples, responses_only=False))
    assert "### Instruction:" in everything and "Add the numbers." in everything


def test_every_assistant_turn_of_a_chat_is_trained(tokenizer):
    tokenizer.chat_template = templates.TEMPLATES["chatml"]
    turns = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
             {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]  # fmt: skip
    trained = masked_text(tokenizer, data.tokenize(tokenizer, [{"messages": turns}], responses_only=True))
    assert "first answer" in trained and "second answer" in trained
    assert "one" not in trained.replace("answer", "") and "user" not in trained


def test_the_loss_mask_takes_the_tokens_that_start_inside_an_answer():
    # Token offsets as a byte-level tokenizer gives them: two tokens of one multi-byte character share an offset.
    offsets = [(0, 3), (3, 4), (4, 5), (4, 5), (5, 7), (7, 8), (8, 9), (9, 10)]
    assert data.in_spans(offsets, [(3, 5), (7, 9)]) == [0, 1, 1, 1, 0, 1, 1, 0]
    assert data.in_spans(offsets, [(1, 4), (6, 10)]) == [0, 1, 0, 0, 0, 1, 1, 1]  # a token starting before is out
    assert data.in_spans(offsets, [(0, 10)]) == [1] * 8 and data.in_spans(offsets, []) == [0] * 8


def test_raw_completions_end_with_eos(tokenizer):
    examples = [data.to_example(ROWS["prompt_completion"], "prompt_completion")]
    trained = masked_text(tokenizer, data.tokenize(tokenizer, examples, responses_only=True))
    assert trained.strip().startswith("Paris.") and trained.endswith(tokenizer.eos_token)


def test_template_choice(tokenizer):
    tokenizer.chat_template = None
    assert templates.choose(tokenizer, "auto", "alpaca") == templates.TEMPLATES["alpaca"]
    assert templates.choose(tokenizer, "auto", "sharegpt") == templates.TEMPLATES["chatml"]
    assert templates.choose(tokenizer, "auto", "text") is None
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert templates.choose(tokenizer, "auto", "alpaca") == "{{ messages[0]['content'] }}"
    assert templates.choose(tokenizer, "chatml", "alpaca") == templates.TEMPLATES["chatml"]


def test_a_template_that_cannot_render_is_a_configuration_error(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('no system turns') }}"
    with pytest.raises(ConfigInvalid, match="CHAT_TEMPLATE"):
        data.tokenize(tokenizer, [data.to_example(ROWS["messages"], "messages")], responses_only=True)


def test_split_holds_out_a_fraction_reproducibly():
    train, held = data.split(20, 0.25, seed=1)
    assert (len(train), len(held)) == (15, 5)
    again = data.split(20, 0.25, seed=1)
    assert (again[0].tolist(), again[1].tolist()) == (train.tolist(), held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(20)) and train.tolist() != sorted(train.tolist())
    assert data.split(20, 0.25, seed=2)[1].tolist() != held.tolist()
    with pytest.raises(DatasetInvalid, match="EVAL_FRACTION"):
        data.split(1, 0.5, seed=1)


def test_sample_inputs_ask_for_the_last_answer(tokenizer):
    tokenizer.chat_template = templates.TEMPLATES["chatml"]
    [sample] = data.sample_inputs(tokenizer, [data.to_example(ROWS["sharegpt"], "sharegpt")])
    assert sample["prompt"] == "Hi" and sample["reference"] == "Hello!"
    assert sample["input"].endswith("<|im_start|>assistant\n") and "Hello!" not in sample["input"]


def test_bos_starts_every_sequence_once_when_the_tokenizer_adds_one():
    """Like Llama's tokenizers: BOS added by the tokenizer, and sometimes by the chat template as well."""
    from tokenizers import processors

    tok = train_tokenizer([{"prompt": "", "completion": "hello there general kenobi " * 3}], vocab_size=300)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    tok.chat_template = templates.TEMPLATES["chatml"]
    raw = data.tokenize(tok, [{"prompt": "hello", "completion": " there"}], responses_only=True)
    tok.chat_template = "{{ bos_token }}" + templates.TEMPLATES["chatml"]
    chat = data.tokenize(tok, [data.to_example(ROWS["messages"], "messages")], responses_only=True)
    for dataset in (raw, chat):
        ids = dataset[0]["input_ids"]
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    [sample] = data.sample_inputs(tok, [data.to_example(ROWS["messages"], "messages")])
    assert sample["input"].startswith("<s>") and sample["input"].count("<s>") == 1


def test_check_lengths_counts_rows_that_lose_their_response_and_the_tokens_in_the_loss(tokenizer):
    examples = [{"prompt": "the quick brown fox " * n, "completion": " jumps over the lazy dog"} for n in (1, 4)]
    dataset = data.tokenize(tokenizer, examples, responses_only=True)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    short, long = (mask.index(1) for mask in dataset["assistant_masks"])  # the prompts' lengths in tokens
    answers = [sum(mask) for mask in dataset["assistant_masks"]]  # the responses' lengths in tokens
    assert short < lengths[0] < long < lengths[1]

    def counts(max_seq_length: int, rows=dataset) -> tuple:
        """(rows cut, rows cut before their response, tokens read, tokens in the loss) at max_seq_length."""
        found = data.check_lengths(rows, max_seq_length)
        assert (found["rows"], found["longest"]) == (2, lengths[1])
        return found["truncated"], found["no_trained_tokens"], found["tokens"], found["loss_tokens"]

    assert counts(lengths[1]) == (0, 0, sum(lengths), sum(answers))
    assert counts(lengths[1] - 1) == (1, 0, sum(lengths) - 1, sum(answers) - 1)  # the response's last token cut
    assert counts(long + 1) == (1, 0, lengths[0] + long + 1, answers[0] + 1)
    assert counts(long) == (1, 1, lengths[0] + long, answers[0])
    assert counts(short + 1)[1] == 1
    problem = (
        rf"all 2 rows lose their whole response at MAX_SEQ_LENGTH={short} \(the shortest prompt is {short} tokens\)"
    )
    with pytest.raises(DatasetInvalid, match=problem + ": raise MAX_SEQ_LENGTH or shorten the prompts"):
        data.check_lengths(dataset, short)
    everything = data.tokenize(tokenizer, examples, responses_only=False)
    assert counts(1, everything) == (2, 0, 2, 2)
    assert counts(lengths[1], everything) == (0, 0, sum(lengths), sum(lengths))


@pytest.mark.parametrize(
    "cpu_max, most, expected",
    [("max 100000", None, 16), ("400000 100000", None, 4), ("max 100000", 8, 8), ("400000 100000", 8, 4),
     ("150000 100000", None, 1), (None, 6, 6)],
)  # fmt: skip
def test_tokenizing_takes_the_cpus_the_pod_may_use(tmp_path, monkeypatch, cpu_max, most, expected):
    """The CPUs of the affinity (all 16 of a node here), capped by the CPU limit (cgroup v2's cpu.max; none under
    cgroup v1) and by DATA_WORKERS, which k8s/base sets to the pod's CPU request."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(data, "CPU_MAX", tmp_path / "cpu.max")
    if cpu_max:
        data.CPU_MAX.write_text(cpu_max + "\n")
    assert data.cores(most) == expected


def test_data_workers_caps_the_tokenizing_processes(tokenizer, tmp_path, caplog, monkeypatch):
    tokenizer.chat_template = templates.TEMPLATES["alpaca"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(data, "CPU_MAX", tmp_path / "no-cgroup")
    files = [("d.jsonl", tmp_path / "d.jsonl")]
    count = 2 * data.ROWS_PER_WORKER
    files[0][1].write_text("".join(json.dumps(ROWS["alpaca"] | {"input": str(i)}) + "\n" for i in range(count)))
    data.build_rows(files, "auto", tmp_path / "rows")
    rows, _ = data.open_rows(tmp_path / "rows")
    train, held = data.split(len(rows), 0.0, seed=1)
    for most, processes in ((1, "1 process"), (None, "2 processes")):
        folder = tmp_path / f"tokens-{most}"
        with caplog.at_level("INFO"):
            data.tokenize_split(tokenizer, rows, train, held, True, 2048, folder, most)
        assert f"data: tokenizing {count} rows in {processes}" in caplog.messages
        shards = [Path(f["filename"]).name for f in data.open_tokens(folder)[0].cache_files]
        assert len(shards) == (1 if most == 1 else 2), shards
