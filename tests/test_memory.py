"""The memory plan: what the estimate counts (checked against real models), how AUTO_BATCH splits a step, the
exit 70 before loading, and that a different split of the same effective batch trains the same run."""

import json
from pathlib import Path

import pytest
import torch

from job import memory
from job.errors import OutOfMemory
from job.settings import Settings
from tests.conftest import DEMO_DATA, jsonl, put, read_objects

GIB = 2**30


def settings(**given) -> Settings:
    return Settings(DATASET_URI="x", OUTPUT_URI="y", **given)


@pytest.fixture(scope="module")
def llama_8b_config():
    """Llama-3-8B's configuration (bench/synthetic_model.py's shape), never instantiated."""
    from transformers import LlamaConfig

    from bench.synthetic_model import SHAPES, VOCAB

    return LlamaConfig(vocab_size=VOCAB, **SHAPES["llama-3-8b"])


@pytest.fixture(scope="module")
def llama_8b(llama_8b_config):
    return memory.shape(llama_8b_config, settings())


def test_the_shape_counts_what_the_real_model_and_its_adapters_hold(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    given = settings(LORA_R=8, LORA_TARGET_MODULES="q_proj,v_proj,down_proj")
    sizes = memory.shape(AutoConfig.from_pretrained(tiny_model_dir), given)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sizes.linear + sizes.other == sum(p.numel() for p in model.parameters())
    lora = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert sizes.lora == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def peak_cases() -> list:
    """tests/memory_peaks.json: each measured case, expected to fail where its `misses` says why."""
    cases = json.loads((Path(__file__).parent / "memory_peaks.json").read_text())["cases"]
    return [
        pytest.param(case, id=case["id"], marks=[pytest.mark.xfail(strict=True, reason=case["misses"])])
        if "misses" in case
        else pytest.param(case, id=case["id"])
        for case in cases
    ]


@pytest.mark.parametrize("case", peak_cases())
def test_the_estimate_from_the_configuration_alone_is_near_each_measured_peak(case):
    """Within 10% of the peak and never more than 5% below it (issue 22): the configuration of the shape measured,
    on the meta device, with the settings it ran."""
    from bench.synthetic_model import config

    ran = case["settings"]
    given = settings(LORA_R=ran["LORA_R"], OPTIMIZER=ran["OPTIMIZER"])
    sizes = memory.shape(config(case["shape"]), given)
    estimate = memory.estimate(sizes, given, case["backend"], ran["tokens_per_micro_batch"], ran["checkpointing"])
    error = estimate / GIB / case["peak_gib"] - 1
    assert -0.05 <= error <= 0.10, f"{estimate / GIB:.2f} GiB estimated, {case['peak_gib']} measured: {error:+.1%}"


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
    with pytest.raises(OutOfMemory) as auto:
        memory.choose(settings(), "unsloth", llama_8b, 2048, 4 * GIB)
    assert auto.value.exit_code == 70
    assert "MAX_SEQ_LENGTH (now 2048)" in str(auto.value) and "4.0 GiB free" in str(auto.value)
    literal = settings(AUTO_BATCH=False, PER_DEVICE_BATCH_SIZE=512, GRAD_ACCUM_STEPS=1)
    with pytest.raises(OutOfMemory) as given:
        memory.choose(literal, "unsloth", llama_8b, 2048, 80 * GIB)
    assert "PER_DEVICE_BATCH_SIZE (now 512)" in str(given.value) and "AUTO_BATCH=true" in str(given.value)
    # As given and within the free memory: kept, even above what AUTO_BATCH would fill.
    kept = memory.choose(settings(AUTO_BATCH=False), "unsloth", llama_8b, 2048, 80 * GIB)
    assert (kept.micro_batch, kept.grad_accum, kept.checkpointing) == (2, 4, True)


def test_a_length_that_cannot_fit_one_sequence_is_exit_70_naming_max_seq_length(llama_8b):
    """On an H200's free memory the 8B shape takes long sequences by narrowing the micro-batch and checkpointing
    (131,072 tokens: 4 x 2 with checkpointing, about 77 GiB estimated); one sequence of 1,048,576 tokens does not fit
    even alone with checkpointing: exit 70 before loading, naming MAX_SEQ_LENGTH first."""
    longest = 2**20
    with pytest.raises(OutOfMemory) as error:
        memory.choose(settings(MAX_SEQ_LENGTH=longest), "unsloth", llama_8b, longest, 139 * GIB)
    message = str(error.value)
    assert error.value.exit_code == 70
    assert f"1 sequence(s) of {longest} tokens per micro-batch, activation checkpointing on" in message
    assert "139.0 GiB free: lower MAX_SEQ_LENGTH (now 1048576)" in message
    fits = memory.choose(settings(MAX_SEQ_LENGTH=longest // 2), "unsloth", llama_8b, longest // 2, 139 * GIB)
    assert (fits.micro_batch, fits.checkpointing) == (1, True), "half the length fits alone"


def test_lora_parameters_and_their_optimizer_state_count_in_the_estimate(llama_8b_config):
    """Llama-3-8B: 32 layers, each adapted on q, k, v, o (4096 in; 4096, 1024, 1024, 4096 out) and gate, up, down
    (4096 and 14336): 81,920 features in and out a layer. Each LoRA parameter keeps 8 bytes of fp32 weight and
    gradient and adamw_8bit's 2 of state; a token keeps LORA_R values for each adapted module of a held layer."""
    low, high = (memory.shape(llama_8b_config, settings(LORA_R=r)) for r in (16, 1024))
    assert (low.lora, high.lora) == (16 * 32 * 81920, 1024 * 32 * 81920)
    tokens, stored = 2 * 2048, 1  # two sequences a micro-batch, checkpointing on: one layer's activations held
    grown = memory.estimate(high, settings(LORA_R=1024), "unsloth", tokens, checkpointing=True) - memory.estimate(
        low, settings(LORA_R=16), "unsloth", tokens, checkpointing=True
    )
    lora_state = (high.lora - low.lora) * (8 + 2)
    activations = tokens * stored * (1024 - 16) * 7 * memory.ACTIVATION["unsloth"]  # 7 adapted modules a layer
    assert abs(grown - lora_state - activations) < 0.001 * GIB, (grown, lora_state, activations)
    # The same GPU fits rank 16 and not rank 1024 (25 GiB of LoRA state alone): exit 70, naming LORA_R.
    assert memory.choose(settings(LORA_R=16), "unsloth", low, 2048, 24 * GIB).estimate_gib < 24
    with pytest.raises(OutOfMemory, match=r"lower LORA_R \(now 1024\)"):
        memory.choose(settings(LORA_R=1024), "unsloth", high, 2048, 24 * GIB)


def test_a_rank_above_the_narrowest_adapted_layer_is_exit_78_with_or_without_a_gpu(llama_8b_config, tiny_model_dir):
    from transformers import AutoConfig

    from job.context import Device
    from job.errors import ConfigInvalid

    cpu = Device(False, False, 0, 0, 1)
    assert memory.plan(settings(LORA_R=1024), cpu, "hf", llama_8b_config, 2048).micro_batch == 2
    with pytest.raises(ConfigInvalid) as error:
        memory.plan(settings(LORA_R=1025), cpu, "hf", llama_8b_config, 2048)
    assert error.value.exit_code == 78 and str(error.value).startswith(
        "LORA_R=1025 is above 1024, the narrowest width (in or out features) of the stand-in LlamaConfig's "
        "LORA_TARGET_MODULES layers"
    )
    assert str(error.value).endswith("set LORA_R to 1024 or less")
    # Without k_proj and v_proj (1,024 out) the narrowest is 4,096.
    mlp = {"LORA_TARGET_MODULES": "gate_proj,up_proj,down_proj,o_proj"}
    assert memory.plan(settings(LORA_R=4096, **mlp), cpu, "hf", llama_8b_config, 2048).micro_batch == 2
    with pytest.raises(ConfigInvalid, match="LORA_R=4097 is above 4096"):
        memory.plan(settings(LORA_R=4097, **mlp), cpu, "hf", llama_8b_config, 2048)
    # A configuration read from BASE_MODEL is named so: the tiny Llama's k_proj has 2 heads of 16 out.
    with pytest.raises(ConfigInvalid, match="LORA_R=33 is above 32, .* of BASE_MODEL's LORA_TARGET_MODULES"):
        memory.plan(settings(LORA_R=33), cpu, "hf", AutoConfig.from_pretrained(tiny_model_dir), 512)


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


def test_unsloths_offloaded_checkpoints_must_fit_the_hosts_memory(llama_8b):
    """unsloth's checkpointing pins every checkpointed layer's input but the last in host memory: at 32,768 tokens the
    8B shape's 8 x 1 split pins 62 GiB, which a pod's memory limit (k8s/base: 96Gi) may not hold, and the kernel's
    OOM killer ends it without a word. The plan narrows the micro-batch to what the host holds, or exits 70."""
    assert memory.offload(llama_8b, "unsloth", 8 * 32768, True) == 31 * 8 * 32768 * 4096 * 2
    assert memory.offload(llama_8b, "unsloth", 8 * 32768, False) == memory.offload(llama_8b, "hf", 8192, True) == 0
    long = settings(MAX_SEQ_LENGTH=32768)
    unbounded = memory.choose(long, "unsloth", llama_8b, 32768, 139 * GIB)
    assert (unbounded.micro_batch, unbounded.checkpointing, unbounded.host_gib) == (8, True, 62.0)
    bounded = memory.choose(long, "unsloth", llama_8b, 32768, 139 * GIB, host=48 * GIB)
    assert (bounded.micro_batch, bounded.grad_accum, bounded.host_gib) == (4, 2, 31.0)
    assert "unsloth offloads 31.0 GiB of checkpointed activations to host memory of the 48.0 GiB free" in bounded.reason
    with pytest.raises(OutOfMemory) as error:
        memory.choose(settings(MAX_SEQ_LENGTH=131072), "unsloth", llama_8b, 131072, 139 * GIB, host=20 * GIB)
    assert error.value.exit_code == 70 and str(error.value).startswith(
        "training needs about 31.0 GiB of host memory for unsloth's offloaded activation checkpoints (1 sequence(s) "
        "of 131072 tokens per micro-batch) and this container has 20.0 GiB free: lower MAX_SEQ_LENGTH (now 131072)"
    )
    assert memory.choose(long, "hf", llama_8b, 32768, 139 * GIB, host=1 * GIB).host_gib is None  # hf pins nothing


@pytest.mark.parametrize(
    "limit, local_world_size, expected_gib", [("max", None, 100), (str(96 * GIB), None, 90), (str(96 * GIB), "2", 45)]
)
def test_the_hosts_free_memory_is_the_containers_limit_less_its_use_but_the_page_cache(tmp_path, monkeypatch, limit,
                                                                                        local_world_size,
                                                                                        expected_gib):  # fmt: skip
    (tmp_path / "memory.max").write_text(limit + "\n")
    (tmp_path / "memory.current").write_text(f"{10 * GIB}\n")
    (tmp_path / "memory.stat").write_text(f"anon {6 * GIB}\nfile {4 * GIB}\n")
    (tmp_path / "meminfo").write_text(f"MemTotal:  {128 * 2**20} kB\nMemAvailable:  {100 * 2**20} kB\n")
    monkeypatch.setattr(memory, "CGROUP", str(tmp_path))
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "meminfo"))
    if local_world_size:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory.host_free() == expected_gib * GIB
