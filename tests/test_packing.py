"""PACKING=true keeps rows apart: the job's own trainer configuration (TRL's bfd packing and its padding-free
collator) on a tiny Llama with LoRA, checked on one packed batch from the trainer's own dataloader, on CPU."""

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import DEMO_DATA

# float32 on CPU. Measured: other rows' losses moved by exactly 0; trainer.compute_loss packed against padded
# differed by 9.5e-7 on a loss of 9.97 (the same sums in another order).
TOLERANCE = 1e-5


@pytest.fixture
def one_thread():
    """A tiny model's matmuls gain nothing from threads, and beside other work they wait on each other: a forward
    here took 0.6 s with 2 threads on a loaded 2-core machine, 0.02 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def per_token_losses(model, batch: dict) -> torch.Tensor:
    """The loss of every token given the ones before it (the target is the next input id, trained or not): [B, T-1]."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        # use_cache=False, as TRL's compute_loss passes it: with a KV cache transformers skips its packed-sequence
        # detection from position_ids (masking_utils._preprocess_mask_arguments): with use_cache=True here, other
        # rows' losses in check 3 moved by 7.8.
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")


def cpu_run(tiny_model_dir, tmp_path, monkeypatch, max_seq_length: int):
    """Settings, device and run of the job's packed training of the tiny Llama with the hf backend, on CPU even on
    the GPU host: the 1e-5 tolerance is float32's; the job's bf16 path on a GPU is a test of its own."""
    from job.context import Device, Run
    from job.settings import Settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = Settings(
        DATASET_URI="x", OUTPUT_URI="y", BASE_MODEL=str(tiny_model_dir), SCRATCH_DIR=str(tmp_path), PACKING=True,
        TRAIN_BACKEND="hf", LOAD_IN_4BIT=False, OPTIMIZER="adamw_torch", DRY_RUN=False, MAX_SEQ_LENGTH=max_seq_length,
    )  # fmt: skip
    device = Device.detect(settings)
    return settings, device, Run.build(settings, "packing", device, "hf")


def test_packed_rows_train_as_if_alone(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    from trl import SFTTrainer

    from job import data, memory, model, templates, train

    # The demo rows are 96-132 tokens: 400 packs three to a sequence, and the default micro-batch of 2 flattens two
    # sequences into one row of six.
    settings, device, run = cpu_run(tiny_model_dir, tmp_path, monkeypatch, 400)
    base = model.Base(str(tiny_model_dir))
    examples, _ = data.load_examples([("demo", DEMO_DATA)], "alpaca")
    tokenizer = model.load_tokenizer(settings, base, examples)
    tokenizer.chat_template = templates.TEMPLATES["alpaca"]
    tokens = data.tokenize(tokenizer, examples, responses_only=True)
    dataset = data.pack(tokens, settings.MAX_SEQ_LENGTH)
    lm = model.load(settings, device, base, tokenizer, "hf")
    torch.manual_seed(0)
    for name, param in lm.named_parameters():
        if "lora_B" in name:  # fresh adapters start at B = 0 and would add nothing to any check below
            param.data.normal_(0, 0.1)
    # The sampler is random but seeded by SEED at the trainer's start, so the batch is the same every run.
    trainer = SFTTrainer(
        model=lm,
        args=train.sft_config(settings, run, memory.plan(settings, device, "hf", None, 0), False, packed=True),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.train_dataset is dataset and train.packing_mode(trainer) == "bfd, padding-free"
    batch = next(iter(trainer.get_train_dataloader()))
    lm.eval()

    # 1. Padding-free: the rows side by side in one row, told apart by position_ids alone.
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = (positions == 0).nonzero().view(-1).tolist()
    rows = list(zip(starts, [*starts[1:], len(positions)]))
    assert batch["input_ids"].shape[0] == 1 and starts[0] == 0 and len(rows) == 6
    for start, end in rows:
        assert torch.equal(positions[start:end], torch.arange(end - start))

    # 2. Responses only, row by row: each packed row is one of tokenize's rows whole (a KeyError: cut or merged),
    # trained exactly where its assistant_masks says; the first token of each row (the one after a boundary) is not.
    masks = {tuple(row["input_ids"]): row["assistant_masks"] for row in tokens}
    for start, end in rows:
        mask = torch.tensor(masks[tuple(ids[start:end].tolist())], dtype=torch.bool)
        assert mask.any() and labels[start] == -100
        assert torch.equal(labels[start:end], torch.where(mask, ids[start:end], -100))

    # 3. Every token of a middle row changed: no other row's loss moves (inside it they moved by up to 9.7).
    start, end = rows[len(rows) // 2]
    changed = dict(batch, input_ids=ids.clone()[None])
    vocab = len(tokenizer)
    changed["input_ids"][0, start:end] = (ids[start:end] + torch.randint(1, vocab, (end - start,))) % vocab
    assert (changed["input_ids"][0, start:end] != ids[start:end]).all()
    others = positions[1:] != 0  # predictions within a row: not the first token of a row from the last of another
    others[start:end] = False  # predictions made inside the changed row
    before, after = per_token_losses(lm, batch)[0], per_token_losses(lm, changed)[0]
    assert (after - before)[others].abs().max() <= TOLERANCE
    assert (after - before)[start : end - 1].abs().max() > 1

    # 4. The trainer's loss (mean over trained tokens) of the packed batch is that of the same rows padded apart.
    width = max(end - start for start, end in rows)
    padded = {
        "input_ids": torch.full((len(rows), width), tokenizer.pad_token_id),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100),
    }
    for i, (start, end) in enumerate(rows):
        padded["input_ids"][i, : end - start] = ids[start:end]
        padded["attention_mask"][i, : end - start] = 1
        padded["labels"][i, : end - start] = labels[start:end]
    with torch.no_grad():  # compute_loss adds use_cache to its inputs: each call gets a copy
        packed_loss = trainer.compute_loss(lm, dict(batch)).item()
        padded_loss = trainer.compute_loss(lm, padded).item()
    assert abs(packed_loss - padded_loss) <= TOLERANCE

    # 5. The check can fail: an all-ones attention_mask (packed detection needs none given), or positions that do
    # not restart, lets the rows after the changed one see it (measured: by up to 7.8 and 7.5).
    ones, arange = torch.ones_like(batch["input_ids"]), torch.arange(len(ids))[None]
    for broken in ({"attention_mask": ones}, {"position_ids": arange}):
        moved = per_token_losses(lm, changed | broken)[0] - per_token_losses(lm, batch | broken)[0]
        assert moved[others].abs().max() > 1, sorted(broken)

    # 6. Padded to one length (unsloth trains Gemma 3 on flex attention, whose masks compile per length): the same
    # rows, then padding that trains nothing and changes no row's loss.
    plan = memory.plan(settings, device, "hf", None, 0)
    config = train.sft_config(settings, run, plan, False, one_length=True, packed=True)
    one_length = SFTTrainer(model=lm, args=config, train_dataset=dataset, processing_class=tokenizer)
    long = next(iter(one_length.get_train_dataloader()))
    assert long["input_ids"].shape == (1, plan.micro_batch * settings.MAX_SEQ_LENGTH) and len(ids) < 800
    assert torch.equal(long["input_ids"][0, : len(ids)], ids) and (long["labels"][0, len(ids) :] == -100).all()
    with torch.no_grad():
        assert abs(one_length.compute_loss(lm, dict(long)).item() - packed_loss) <= TOLERANCE


def test_the_job_packs_a_large_set_in_workers_and_the_same_on_any_machine(tmp_path, monkeypatch):
    """data.pack labels and packs with TRL's best fit in a worker per data.PACKING_ROWS_PER_WORKER rows (here 2,000),
    up to data.PACKING_WORKERS (TRL's own preparation took about 100 us a row in Python, unsloth's in one process). TRL
    packs each worker's share apart, so the packs change with the count (one process packs otherwise): a node of 1
    core and one of 64 must pack the same sequences, or an attempt resumed on the other would skip batches it never
    trained."""
    from datasets import Dataset, load_from_disk

    from job import data

    monkeypatch.setattr(data, "PACKING_ROWS_PER_WORKER", 2000)
    count = 5200  # two workers' shares, not a multiple of datasets' batch of 1,000
    lengths = [random.Random(n).randint(5, 200) for n in range(count)]
    rows = {"input_ids": [[5 + (n + i) % 50 for i in range(k)] for n, k in enumerate(lengths)],
            "assistant_masks": [[0] * (k // 3) + [1] * (k - k // 3) for k in lengths]}  # fmt: skip
    Dataset.from_dict(rows).save_to_disk(tmp_path / "tokens")
    packed, job = {}, data.PACKING_WORKERS
    for cores, most in ((1, job), (64, job), (64, 1)):  # the job's count on two machines; one process
        monkeypatch.setattr(data, "cores", lambda cores=cores: cores)
        monkeypatch.setattr(data, "PACKING_WORKERS", most)
        tokens = load_from_disk(tmp_path / "tokens")  # memory-mapped, as the job's files are
        packed[cores, most] = data.pack(tokens, 256, tmp_path / f"packed-{cores}-{most}" / "train.arrow")
    one, other, serial = packed[1, job], packed[64, job], packed[64, 1]
    names = [Path(f["filename"]).name for f in one.cache_files]
    assert names == ["train_00000_of_00002.arrow", "train_00001_of_00002.arrow"], names  # made by two workers
    assert one["seq_lengths"] == other["seq_lengths"] and len(one) < count / 2
    assert one["input_ids"] == other["input_ids"] and one["labels"] == other["labels"]
    assert serial["seq_lengths"] != one["seq_lengths"], "the packs no longer depend on the count: see PACKING_WORKERS"
    assert data.row_count(one) == data.row_count(serial) == count and data.row_count(Dataset.from_dict(rows)) == count
    assert sum(label != -100 for row in one["labels"] for label in row) == sum(k - k // 3 for k in lengths)


def test_packed_rows_keep_their_start_and_rows_with_nothing_to_learn_are_left_out():
    """Each row cut to MAX_SEQ_LENGTH (its start kept, as TRL cuts), its labels the ids where the mask is 1; a row
    whose trained tokens all lie beyond the cut is left out (it would add nothing to the loss). In batches of 3 rows,
    as datasets' map hands them over."""
    from datasets import Dataset

    from job import data

    rows = [
        ([1, 2, 3, 4], [0, 0, 1, 1]),
        ([5, 6, 7, 8, 9, 10, 11], [0, 1, 1, 0, 0, 1, 1]),
        ([12, 13], [1, 1]),
        ([14, 15, 16, 17, 18, 19], [0, 0, 0, 0, 0, 1]),
        ([20, 21, 22], [0, 0, 0]),
        ([23, 24, 25], [0, 1, 0]),
    ]
    tokens = Dataset.from_dict({"input_ids": [r[0] for r in rows], "assistant_masks": [r[1] for r in rows]})
    labelled = tokens.with_format("arrow").map(
        data._labels, batched=True, batch_size=3, fn_kwargs={"max_seq_length": 5}, remove_columns=tokens.column_names
    )
    labelled = labelled.with_format(None)
    assert labelled["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12, 13], [23, 24, 25]]
    assert labelled["labels"] == [[-100, -100, 3, 4], [-100, 6, 7, -100, -100, 10, 11], [12, 13], [-100, 24, -100]]
    packed = data.pack(tokens, 5)
    assert sorted(n for row in packed["seq_lengths"] for n in row) == [2, 3, 4, 5]  # the 7-token row cut to 5
    assert sorted(t for row in packed["input_ids"] for t in row) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 23, 24, 25]
    assert all(len(row) <= 5 for row in packed["input_ids"]) and data.row_count(packed) == 4


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b", "mistral-7b-v0.3", "phi-4",
                                   "gpt-oss-20b"])  # fmt: skip
def test_which_families_keep_packed_rows_apart(tmp_path, shape, one_thread):
    """Each family at the dry run's size, in float32 with transformers' default attention: a row packed after another
    (position_ids restarting, no attention_mask, as TRL's padding-free collator gives it) gets the logits it gets
    alone, except where kernels.MIXES_PACKED_ROWS says it does not (gpt-oss: its model builds the mask without
    position_ids), and the job trains those one row per sequence."""
    from transformers import AutoModelForCausalLM

    from bench.synthetic_model import build
    from job import kernels

    build(shape, tmp_path / shape, tiny=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / shape, dtype=torch.float32).eval()
    torch.manual_seed(0)
    first, second = torch.randint(5, 200, (7,)), torch.randint(5, 200, (11,))
    positions = torch.cat([torch.arange(7), torch.arange(11)])[None]
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second[None], use_cache=False).logits
    moved = (packed[0, 7:] - alone[0]).abs().max().item()
    apart = kernels.packs_apart(model.config)
    assert (moved <= TOLERANCE) == apart, f"{shape}: the second row's logits moved by {moved}"
