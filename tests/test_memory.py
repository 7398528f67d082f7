"""The memory plan: what the estimate counts (checked against real models), how AUTO_BATCH splits a step, the
exit 70 before loading, and that a different split of the same effective batch trains the same run."""

import json

import pytest
import torch

from job import memory
from job.errors import GpuOutOfMemory
from job.settings import Settings
from tests.conftest import DEMO_DATA, jsonl, put, read_objects

GIB = 2**30


def settings(**given) -> Settings:
    return Settings(DATASET_URI="x", OUTPUT_URI="y", **given)


@pytest.fixture(scope="module")
def llama_8b():
    """Llama-3-8B's configuration (bench/synthetic_model.py's shape), never instantiated."""
    from transformers import LlamaConfig

    from bench.synthetic_model import SHAPES, VOCAB

    return memory.shape(LlamaConfig(vocab_size=VOCAB, **SHAPES["llama-3-8b"]), settings())


def test_the_shape_counts_what_the_real_model_and_its_adapters_hold(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    given = settings(LORA_R=8, LORA_TARGET_MODULES="q_proj,v_proj,down_proj")
    sizes = memory.shape(AutoConfig.from_pretrained(tiny_model_dir), given)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sizes.linear + sizes.other == sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert sizes.lora == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_the_8b_estimate_is_near_the_peaks_measured_on_an_h200(llama_8b):
    """docs/benchmarks.md, 2026-11-30 real-data table: unsloth, 8 packed sequences of 2,048 tokens without
    checkpointing 66.1 GiB; 2 x 2,048 with checkpointing 6.7 GiB."""
    s = settings()
    without = memory.estimate(llama_8b, s, "unsloth", 8 * 2048, checkpointing=False) / GIB
    with_checkpointing = memory.estimate(llama_8b, s, "unsloth", 2 * 2048, checkpointing=True) / GIB
    assert abs(without / 66.1 - 1) < 0.15 and abs(with_checkpointing / 6.7 - 1) < 0.15, (without, with_checkpointing)


def test_auto_batch_keeps_the_effective_batch_and_fills_what_is_free(llama_8b):
    s = settings()  # PER_DEVICE_BATCH_SIZE=2 x GRAD_ACCUM_STEPS=4: 8 sequences a step
    plans = {free: memory.choose(s, "unsloth", llama_8b, 2048, free * GIB) for free in (139, 80, 40, 24, 12, 8)}
    assert all(p.micro_batch * p.grad_accum == 8 for p in plans.values())
    assert (plans[139].micro_batch, plans[139].checkpointing) == (8, False)
    assert (plans[40].micro_batch, plans[40].checkpointing) == (2, False)
    assert (plans[12].micro_batch, plans[12].checkpointing) == (8, True)
    assert plans[8].checkpointing and plans[8].micro_batch < 8
    # More memory never gives a slower plan: checkpointing turns off, then the micro-batch widens.
    order = [(not p.checkpointing, p.micro_batch) for _, p in sorted(plans.items())]
    assert order == sorted(order)
    for p in plans.values():
        assert p.estimate_gib <= memory.FILL * p.free_gib


def test_what_cannot_fit_is_exit_70_naming_the_settings_to_change(llama_8b):
    with pytest.raises(GpuOutOfMemory) as auto:
        memory.choose(settings(), "unsloth", llama_8b, 2048, 4 * GIB)
    assert auto.value.exit_code == 70
    assert "MAX_SEQ_LENGTH (now 2048)" in str(auto.value) and "4.0 GiB free" in str(auto.value)
    literal = settings(AUTO_BATCH=False, PER_DEVICE_BATCH_SIZE=512, GRAD_ACCUM_STEPS=1)
    with pytest.raises(GpuOutOfMemory) as given:
        memory.choose(literal, "unsloth", llama_8b, 2048, 80 * GIB)
    assert "PER_DEVICE_BATCH_SIZE (now 512)" in str(given.value) and "AUTO_BATCH=true" in str(given.value)
    # As given and within the free memory: kept, even above what AUTO_BATCH would fill.
    kept = memory.choose(settings(AUTO_BATCH=False), "unsloth", llama_8b, 2048, 80 * GIB)
    assert (kept.micro_batch, kept.grad_accum, kept.checkpointing) == (2, 4, True)


def test_without_a_gpu_the_batch_is_as_given():
    from job.context import Device

    plan = memory.plan(settings(), Device(False, False, 0, 0, 1), "hf", None, 2048)
    assert (plan.micro_batch, plan.grad_accum, plan.estimate_gib) == (2, 4, None)


@pytest.mark.parametrize("packing", ["true", "false"])
def test_another_split_of_the_same_batch_trains_the_same_run(run_job, s3, bucket, tiny_model_dir, packing):
    """What AUTO_BATCH changes (the micro-batch and accumulation) leaves the learning alone: 2 x 4 and 8 x 1
    give the same losses step by step on a fixed seed (float32 on CPU; the sums differ in order only)."""
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()][:64]
    env = {"BASE_MODEL": str(tiny_model_dir), "DATASET_URI": put(s3, bucket, "d.jsonl", jsonl(rows)),
           "OUTPUT_URI": f"s3://{bucket}/runs", "TRAIN_BACKEND": "hf", "LOAD_IN_4BIT": "false",
           "OPTIMIZER": "adamw_torch", "MAX_STEPS": "6", "LEARNING_RATE": "2e-3", "WARMUP_STEPS": "1",
           "MAX_SEQ_LENGTH": "512", "PACKING": packing, "CHECKPOINT_EVERY_STEPS": "0", "NUM_SAMPLE_PROMPTS": "1",
           "MAX_NEW_TOKENS": "2"}  # fmt: skip
    losses = {}
    for split in ((2, 4), (8, 1), (4, 1)):  # 4 x 1: another effective batch, which must train otherwise
        run_id = f"split-{packing}-{split[0]}x{split[1]}"
        result = run_job(env | {"PER_DEVICE_BATCH_SIZE": str(split[0]), "GRAD_ACCUM_STEPS": str(split[1]),
                                "RUN_ID": run_id})  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        log = read_objects(s3, bucket, f"runs/{run_id}/")[f"runs/{run_id}/train_log.jsonl"]
        losses[split] = [row["loss"] for row in map(json.loads, log.decode().splitlines()) if "loss" in row]
        metrics = json.loads(read_objects(s3, bucket, f"runs/{run_id}/")[f"runs/{run_id}/metrics.json"])
        assert (metrics["micro_batch"], metrics["grad_accum"]) == split
    assert len(losses[(2, 4)]) == 6
    assert torch.allclose(torch.tensor(losses[(2, 4)]), torch.tensor(losses[(8, 1)]), rtol=1e-4), losses
    assert not torch.allclose(torch.tensor(losses[(2, 4)]), torch.tensor(losses[(4, 1)]), rtol=1e-2), losses


def _least(rank: int, rendezvous: str, out) -> None:
    import torch.distributed as dist

    from job import distributed
    from job.context import Device

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    out[rank] = distributed.least(Device(False, False, rank, rank, 2), [7 * GIB, 3 * GIB][rank])
    dist.destroy_process_group()


def test_every_rank_plans_with_the_least_free_memory_of_any(tmp_path):
    """Ranks with different free memory (a shared GPU) must still train one plan, or DDP hangs."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_least, args=(str(tmp_path / "rendezvous"), out), nprocs=2)
    assert dict(out) == {0: 3 * GIB, 1: 3 * GIB}
