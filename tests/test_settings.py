import re

import pytest

from job.errors import ConfigInvalid
from job.settings import Settings, read_settings
from tests.conftest import ROOT

REQUIRED = {"DATASET_URI": "s3://data/train.jsonl", "OUTPUT_URI": "s3://out/runs"}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment (no variable of the Settings class set) in an empty working directory."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_defaults_follow_the_unsloth_notebook(env):
    env(**REQUIRED)
    s = read_settings()
    assert (s.BASE_MODEL, s.LORA_R, s.LORA_ALPHA, s.LEARNING_RATE) == ("unsloth/llama-3-8b-bnb-4bit", 16, 16, 2e-4)
    assert (s.PER_DEVICE_BATCH_SIZE, s.GRAD_ACCUM_STEPS, s.MAX_STEPS, s.WARMUP_STEPS) == (2, 4, 60, 5)
    assert (s.OPTIMIZER, s.LR_SCHEDULER, s.SEED, s.MAX_SEQ_LENGTH) == ("adamw_8bit", "linear", 3407, 2048)
    assert s.LORA_TARGET_MODULES == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert s.LOAD_IN_4BIT and s.TRAIN_ON_RESPONSES_ONLY and not s.DRY_RUN


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("TRUE", True), ("1", True), ("Yes", True), ("false", False), ("0", False),
                        ("no", False), ("NO", False)]
)  # fmt: skip
def test_booleans_accept_the_usual_spellings(env, text, value):
    env(**REQUIRED, PACKING=text)
    assert read_settings().PACKING is value


def test_target_modules_are_comma_separated(env):
    env(**REQUIRED, LORA_TARGET_MODULES=" q_proj, v_proj ,")
    assert read_settings().LORA_TARGET_MODULES == ["q_proj", "v_proj"]


def test_every_problem_is_reported_at_once(env):
    env(OUTPUT_URI="s3:///nobucket", LORA_R="zero", PACKING="maybe", EVAL_FRACTION="1.5", TRAIN_BACKEND="tpu")
    with pytest.raises(ConfigInvalid) as error:
        read_settings()
    message = str(error.value)
    for name in ("DATASET_URI is required", "OUTPUT_URI", "LORA_R", "PACKING", "EVAL_FRACTION", "TRAIN_BACKEND"):
        assert name in message
    assert "'maybe'" in message and "\n" not in message
    assert error.value.exit_code == 78


def test_secrets_are_masked_in_the_public_configuration(env):
    env(**REQUIRED, HF_TOKEN="hf_canary_123", AWS_SECRET_ACCESS_KEY="aws-canary-456")
    public = read_settings().public()
    assert "canary" not in str(public)
    assert public["HF_TOKEN"] == "**********"


def test_real_environment_wins_over_the_env_file(env, tmp_path):
    (tmp_path / ".env").write_text("MAX_STEPS=7\nLORA_R=8\nDATASET_URI=s3://from-file/x.jsonl\nOUTPUT_URI=/tmp/o\n")
    env(LORA_R="32")
    s = read_settings()
    assert (s.MAX_STEPS, s.LORA_R, s.DATASET_URI) == (7, 32, "s3://from-file/x.jsonl")


def test_env_file_names_another_file(env, tmp_path):
    (tmp_path / "job.env").write_text("DATASET_URI=./d.jsonl\nOUTPUT_URI=./o\nSEED=11\n")
    env(ENV_FILE=str(tmp_path / "job.env"))
    assert read_settings().SEED == 11
    env(ENV_FILE=str(tmp_path / "missing.env"))
    with pytest.raises(ConfigInvalid, match="ENV_FILE"):
        read_settings()


def test_run_id_is_a_stable_hash_of_what_is_trained(env):
    env(**REQUIRED)
    first = read_settings().run_id()
    env(LOG_FORMAT="text", AWS_SECRET_ACCESS_KEY="other")
    assert read_settings().run_id() == first
    env(LEARNING_RATE="1e-4")
    assert read_settings().run_id() != first
    env(RUN_ID="my-run")
    assert read_settings().run_id() == "my-run"


def test_dry_run_trains_a_few_steps_on_cpu(env):
    env(**REQUIRED, DRY_RUN="true", DRY_RUN_STEPS="4")
    s = read_settings()
    assert (s.TRAIN_BACKEND, s.LOAD_IN_4BIT, s.OPTIMIZER, s.MAX_STEPS) == ("hf", False, "adamw_torch", 4)


def test_env_example_lists_exactly_the_settings():
    text = (ROOT / "env.example").read_text()
    listed = re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", text, flags=re.M)
    assert sorted(listed) == sorted(Settings.model_fields)
    assert len(listed) == len(set(listed)), "a variable is listed twice"


def test_a_sweep_line_configures_one_index_of_an_indexed_job(env, tmp_path):
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text('{"LEARNING_RATE": 1e-4, "LORA_R": 8}\n{"LEARNING_RATE": 3e-4, "PACKING": true}\n')
    env(**REQUIRED, SWEEP_FILE=str(sweep), JOB_COMPLETION_INDEX="1", LEARNING_RATE="9e-9")
    s = read_settings()
    assert (s.LEARNING_RATE, s.PACKING, s.LORA_R) == (3e-4, True, 16)
    env(JOB_COMPLETION_INDEX="0")
    first = read_settings()
    assert first.LORA_R == 8 and first.run_id() != s.run_id(), "each configuration gets its own run"


@pytest.mark.parametrize(
    ("lines", "index", "problem"),
    [('{"LORA_R": 8}\n', "3", "JOB_COMPLETION_INDEX=3: SWEEP_FILE has 1 configurations"),
     ('{"LORA_RANK": 8}\n', "0", "unknown variables \\['LORA_RANK'\\]"),
     ("{oops\n", "0", "invalid JSON"),
     ('{"LORA_R": 8}\n', None, "JOB_COMPLETION_INDEX is not")],
)  # fmt: skip
def test_bad_sweeps_are_configuration_errors(env, tmp_path, lines, index, problem):
    (tmp_path / "sweep.jsonl").write_text(lines)
    env(**REQUIRED, SWEEP_FILE=str(tmp_path / "sweep.jsonl"), **({"JOB_COMPLETION_INDEX": index} if index else {}))
    with pytest.raises(ConfigInvalid, match=problem):
        read_settings()
