import os
import re

import pytest

from job.errors import ConfigInvalid
from job.settings import NOT_TRAINED, TRAINED, Settings, read_settings
from tests.conftest import ROOT

REQUIRED = {"DATASET_URI": "s3://data/train.jsonl", "OUTPUT_URI": "s3://out/runs"}
DATASET = [{"uri": "s3://data/train.jsonl", "etag": "abc", "bytes": 1234}]


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment (no variable of the Settings class set) in an empty working directory; what
    read_settings copies from an env file into the environment is removed afterwards."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    yield set_env
    os.environ.clear()
    os.environ.update(before)


def fails(*expected: str) -> str:
    """read_settings' one-line ConfigInvalid (exit 78) message, checked to contain each expected text."""
    with pytest.raises(ConfigInvalid) as error:
        read_settings()
    message = str(error.value)
    assert error.value.exit_code == 78 and "\n" not in message
    for text in expected:
        assert text in message
    return message


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


def test_report_to_is_a_comma_list_of_known_trackers(env):
    env(**REQUIRED, REPORT_TO="wandb, mlflow,tensorboard")
    assert read_settings().REPORT_TO == ["wandb", "mlflow", "tensorboard"]
    env(**REQUIRED, REPORT_TO="wandb,comet")
    with pytest.raises(ConfigInvalid) as error:
        read_settings()
    assert "REPORT_TO" in str(error.value) and "tensorboard, wandb, mlflow" in str(error.value)


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


def test_every_setting_is_either_trained_or_not(env):
    assert not TRAINED & NOT_TRAINED, f"in both: {sorted(TRAINED & NOT_TRAINED)}"
    assert set(Settings.model_fields) == TRAINED | NOT_TRAINED, (
        f"unclassified: {sorted(set(Settings.model_fields) - TRAINED - NOT_TRAINED)}, "
        f"not settings: {sorted(TRAINED | NOT_TRAINED - set(Settings.model_fields))}"
    )
    env(**REQUIRED)
    assert set(read_settings().trained()) == TRAINED


def test_run_id_is_a_stable_hash_of_what_is_trained_and_on_what(env):
    env(**REQUIRED)
    first = read_settings().run_id(DATASET)
    assert re.fullmatch(r"[0-9a-f]{12}", first) and read_settings().run_id([dict(DATASET[0])]) == first
    env(LOG_FORMAT="text", AWS_SECRET_ACCESS_KEY="other", OUTPUT_URI="s3://elsewhere/runs", MAX_NEW_TOKENS="64",
        CHECKPOINT_EVERY_STEPS="10", DATASET_URI="s3://copy/train.jsonl", CHECKPOINT_KEEP="5")  # fmt: skip
    assert read_settings().run_id(DATASET) == first
    assert read_settings().run_id([DATASET[0] | {"etag": "def"}]) != first, "other data is another run"
    env(LEARNING_RATE="1e-4")
    changed = read_settings().run_id(DATASET)
    assert changed != first
    env(RUN_NAME="llama-ft")
    assert read_settings().run_id(DATASET) == f"llama-ft-{changed}"
    env(RUN_ID="my-run")
    assert read_settings().run_id(DATASET) == "my-run"


def test_public_configuration_leaves_the_run_id_to_the_caller(env):
    env(**REQUIRED)
    public = read_settings().public()
    assert public["RUN_ID"] is None and public["OUTPUT_URI"] == "s3://out/runs"


def test_dry_run_trains_a_few_steps_on_cpu(env):
    env(**REQUIRED, DRY_RUN="true", DRY_RUN_STEPS="4")
    s = read_settings()
    assert (s.TRAIN_BACKEND, s.LOAD_IN_4BIT, s.OPTIMIZER, s.MAX_STEPS) == ("hf", False, "adamw_torch", 4)


@pytest.mark.parametrize(("steps", "warmup", "expected"), [(None, None, 0), ("4", None, 1), ("40", None, 5),
                                                           ("40", "20", 10), ("40", "2", 2)])  # fmt: skip
def test_a_dry_run_warms_up_for_at_most_a_quarter_of_its_steps(env, steps, warmup, expected):
    # The default 3-step dry run with the default 5 warm-up steps trained at lr 0, 4e-5, 8e-5.
    env(**REQUIRED, DRY_RUN="true", **({"DRY_RUN_STEPS": steps} if steps else {}),
        **({"WARMUP_STEPS": warmup} if warmup else {}))  # fmt: skip
    assert expected == read_settings().WARMUP_STEPS


def test_warm_up_outside_a_dry_run_is_as_given(env):
    env(**REQUIRED, WARMUP_STEPS="50")
    assert read_settings().WARMUP_STEPS == 50


def test_env_example_lists_exactly_the_settings():
    text = (ROOT / "env.example").read_text()
    listed = re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", text, flags=re.M)
    assert sorted(listed) == sorted(Settings.model_fields)
    assert len(listed) == len(set(listed)), "a variable is listed twice"


def test_a_sweep_line_configures_one_index_of_an_indexed_job(env, tmp_path):
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text('{"LEARNING_RATE": 1e-4, "LORA_R": 8}\n{"LEARNING_RATE": 3e-4, "PACKING": false}\n')
    env(**REQUIRED, SWEEP_FILE=str(sweep), JOB_COMPLETION_INDEX="1", LEARNING_RATE="9e-9")
    s = read_settings()
    assert (s.LEARNING_RATE, s.PACKING, s.LORA_R) == (3e-4, False, 16)
    env(JOB_COMPLETION_INDEX="0")
    first = read_settings()
    assert first.LORA_R == 8 and first.run_id(DATASET) != s.run_id(DATASET), "each configuration gets its own run"


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


def test_num_epochs_alone_trains_by_epochs(env):
    env(**REQUIRED)
    assert (read_settings().MAX_STEPS, read_settings().NUM_EPOCHS) == (60, 1)
    env(NUM_EPOCHS="2")
    assert (read_settings().MAX_STEPS, read_settings().NUM_EPOCHS) == (0, 2)
    env(MAX_STEPS="0")
    assert read_settings().MAX_STEPS == 0
    env(MAX_STEPS="100")
    fails("MAX_STEPS=100 and NUM_EPOCHS=2 are both set: set only one")


def test_num_epochs_from_the_env_file_or_a_sweep_trains_by_epochs(env, tmp_path):
    (tmp_path / ".env").write_text("NUM_EPOCHS=3\n")
    env(**REQUIRED)
    assert read_settings().MAX_STEPS == 0
    (tmp_path / ".env").unlink()
    (tmp_path / "sweep.jsonl").write_text('{"NUM_EPOCHS": 2}\n')
    env(SWEEP_FILE=str(tmp_path / "sweep.jsonl"), JOB_COMPLETION_INDEX="0")
    assert (read_settings().MAX_STEPS, read_settings().NUM_EPOCHS) == (0, 2)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("OUTPUT_URI", "s3://out", "s3://out"), ("OUTPUT_URI", "/srv/runs", "/srv/runs"), ("OUTPUT_URI", "out", "out"),
     ("OUTPUT_URI", "file:///srv/runs", "/srv/runs"), ("DATASET_URI", "./data/train.jsonl", "./data/train.jsonl"),
     ("DATASET_URI", "s3://data/prefix/", "s3://data/prefix/"), ("DATASET_URI", "file:///d.jsonl", "/d.jsonl"),
     ("BASE_MODEL", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"), ("BASE_MODEL", "gpt2", "gpt2"),
     ("BASE_MODEL", "s3://models/llama/", "s3://models/llama/"), ("BASE_MODEL", "/models/llama", "/models/llama"),
     ("SAMPLE_PROMPTS_URI", "s3://data/prompts.jsonl", "s3://data/prompts.jsonl")],
)  # fmt: skip
def test_addresses_are_s3_or_local(env, name, value, expected):
    env(**REQUIRED | {name: value})
    assert getattr(read_settings(), name) == expected


@pytest.mark.parametrize("name", ["OUTPUT_URI", "DATASET_URI", "BASE_MODEL", "SAMPLE_PROMPTS_URI"])
@pytest.mark.parametrize("value", ["ftp://host/x", "gs://bucket/x", "https://host/x", "hf://org/model", "s3:/bucket/x",
                                   "S3://bucket/x", "s3://", "s3:///key", "s3:bucket/x",
                                   "s3://a b/x"])  # fmt: skip
def test_other_addresses_are_configuration_errors(env, name, value):
    env(**REQUIRED | {name: value})
    fails(f"{name} (got {value!r})", "s3://")


def test_an_address_error_never_shows_credentials_or_a_signature(env):
    env(
        **REQUIRED
        | {"DATASET_URI": "https://user:pass@host/x.jsonl?sig=abc", "OUTPUT_URI": "s3://user:tok@bucket/x?X-Sig=1"}
    )
    message = fails("DATASET_URI (got 'https://***@host/x.jsonl?***')", "OUTPUT_URI")
    assert "pass" not in message and "sig=abc" not in message and "tok" not in message and "X-Sig" not in message


def test_output_uri_that_is_a_file_is_a_configuration_error(env, tmp_path):
    (tmp_path / "runs").write_text("")
    env(**REQUIRED | {"OUTPUT_URI": str(tmp_path / "runs")})
    fails(f"OUTPUT_URI (got '{tmp_path / 'runs'}'): is a file: give a directory")


@pytest.mark.parametrize("name", ["BASE_MODEL", "DATASET_URI", "OUTPUT_URI"])
def test_an_address_set_but_empty_is_a_configuration_error(env, name):
    env(**REQUIRED | {name: ""})
    message = fails(f"{name} is set but empty")
    assert "is required" not in message and message.count(name) == 1
    env(**{name: "  "})
    fails(f"{name} (got '  '): is set but empty")
    if name == "BASE_MODEL":
        assert "unset it for the default, or name a model" in message


def test_other_empty_variables_mean_the_default(env, tmp_path):
    (tmp_path / ".env").write_text("LORA_R=\nRUN_ID=\n")
    env(**REQUIRED, LEARNING_RATE="", SAMPLE_PROMPTS_URI="")
    s = read_settings()
    assert (s.LORA_R, s.RUN_ID, s.LEARNING_RATE, s.SAMPLE_PROMPTS_URI) == (16, None, 2e-4, None)


def test_scale_settings(env):
    env(**REQUIRED)
    s = read_settings()
    assert (s.NPROC_PER_NODE, s.NNODES, s.NODE_RANK, s.RDZV_ENDPOINT) == ("1", 1, 0, None)
    assert (s.CHECKPOINT_KEEP, s.LEASE_SECONDS, s.RUN_NAME) == (2, 60, None)
    env(NPROC_PER_NODE="GPU", NNODES="2", NODE_RANK="1", RDZV_ENDPOINT="train-0.train:29400")
    assert (read_settings().NPROC_PER_NODE, read_settings().NNODES) == ("gpu", 2)
    env(NPROC_PER_NODE="8")
    assert read_settings().NPROC_PER_NODE == "8"


@pytest.mark.parametrize(
    ("values", "problem"),
    [({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE (got '0'): give gpu"),
     ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE (got 'two')"),
     ({"NNODES": "2"}, "RDZV_ENDPOINT is required when NNODES=2"),
     ({"NNODES": "2", "NODE_RANK": "2", "RDZV_ENDPOINT": "n0:29400"}, "NODE_RANK=2 with NNODES=2"),
     ({"NODE_RANK": "1"}, "NODE_RANK=1 with NNODES=1"),
     ({"RDZV_ENDPOINT": "node0"}, "RDZV_ENDPOINT (got 'node0')"),
     ({"CHECKPOINT_KEEP": "0"}, "CHECKPOINT_KEEP (got '0')"),
     ({"LEASE_SECONDS": "1"}, "LEASE_SECONDS (got '1')"),
     ({"RUN_NAME": "x" * 49}, "RUN_NAME"),
     ({"RUN_NAME": "my run"}, "RUN_NAME (got 'my run')")],
)  # fmt: skip
def test_bad_scale_and_run_settings_are_configuration_errors(env, values, problem):
    env(**REQUIRED, **values)
    fails(problem)


def test_a_name_in_the_env_file_that_is_not_a_setting_is_an_error(env, tmp_path):
    (tmp_path / ".env").write_text("LORA_RANK=8\nFROBNICATE=1\nlearning_rate=1e-4\nNCCL_DEBUG=INFO\n")
    env(**REQUIRED)
    message = fails(
        "LORA_RANK in .env is not a setting: did you mean LORA_R?",
        "FROBNICATE in .env is not a setting: it is unknown: use names from env.example",
        "learning_rate in .env is not a setting: did you mean LEARNING_RATE?",
    )
    assert "NCCL_DEBUG" not in message, "the platform's own variables pass through the env file"
    assert "LORA_RANK" not in os.environ, "a misspelled name is not loaded"


@pytest.mark.parametrize(
    ("typo", "setting"),
    [("LORA_RANK", "LORA_R"), ("LERNING_RATE", "LEARNING_RATE"), ("MAXSTEPS", "MAX_STEPS"),
     ("BATCH_SIZE", "PER_DEVICE_BATCH_SIZE"), ("LORA_ALPH", "LORA_ALPHA"),
     ("GRAD_ACCUMULATION_STEPS", "GRAD_ACCUM_STEPS"), ("GRADIENT_ACCUMULATION_STEPS", "GRAD_ACCUM_STEPS"),
     ("LEARNINGRATE", "LEARNING_RATE"), ("NUM_EPOCH", "NUM_EPOCHS"),
     ("DATASET_URL", "DATASET_URI"), ("DATASET_PATH", "DATASET_URI"), ("OUTPUT_DIR", "OUTPUT_URI"),
     ("MAX_SEQ_LEN", "MAX_SEQ_LENGTH"), ("LORA_DROP_OUT", "LORA_DROPOUT"), ("WARMUP_STEP", "WARMUP_STEPS"),
     ("LR_SCHEDULER_TYPE", "LR_SCHEDULER"), ("OPTIM", "OPTIMIZER"), ("BASEMODEL", "BASE_MODEL"),
     ("PER_DEVICE_TRAIN_BATCH_SIZE", "PER_DEVICE_BATCH_SIZE"), ("DATASET_FORMAY", "DATASET_FORMAT"),
     ("NUM_NODES", "NNODES"), ("RDZV_ENDPOINTS", "RDZV_ENDPOINT"), ("EPOCHS", "NUM_EPOCHS"),
     ("TEMPLATE", "CHAT_TEMPLATE"), ("lora_r", "LORA_R"), ("Learning_Rate", "LEARNING_RATE")],
)  # fmt: skip
def test_a_near_miss_of_a_setting_in_the_environment_is_an_error(env, typo, setting):
    env(**REQUIRED, **{typo: "8"})
    fails(f"{typo} is set but is not a setting: did you mean {setting}?")


# What a GPU pod under torchrun and Kubernetes (or a Kubeflow PyTorchJob, or a CI runner) has in its environment.
PLATFORM = [
    "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBERNETES_SERVICE_PORT_HTTPS", "KUBERNETES_PORT",
    "KUBERNETES_PORT_443_TCP", "KUBERNETES_PORT_443_TCP_ADDR", "KUBERNETES_PORT_443_TCP_PORT",
    "KUBERNETES_PORT_443_TCP_PROTO", "FINETUNE_SERVICE_HOST", "FINETUNE_SERVICE_PORT", "FINETUNE_PORT_29400_TCP_ADDR",
    "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "NVIDIA_REQUIRE_CUDA", "NV_CUDA_LIB_VERSION",
    "CUDA_VERSION", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NCCL_VERSION", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
    "PYTORCH_CUDA_ALLOC_CONF", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_DISTRIBUTED_DEBUG", "HF_HOME",
    "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_ENABLE_HF_TRANSFER", "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_STS_REGIONAL_ENDPOINTS", "AWS_ENDPOINT_URL_STS", "AWS_PROFILE", "MASTER_ADDR", "MASTER_PORT",
    "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE", "OMP_NUM_THREADS", "PET_NPROC_PER_NODE", "PET_NNODES", "PET_NODE_RANK",
    "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "TRITON_CACHE_DIR", "UNSLOTH_COMPILE_DISABLE", "XDG_CACHE_HOME",
    "PYTHONUNBUFFERED", "PYTHONPATH", "LD_LIBRARY_PATH", "LIBRARY_PATH", "HOSTNAME", "HOME", "PATH", "TERM", "LANG",
    "LC_ALL", "PWD", "SHLVL", "USER", "TMPDIR", "TZ", "POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE_NAME", "JOB_NAME",
    "GITHUB_RUN_ID", "RUNNER_NAME", "RUNNER_TEMP", "ImageVersion", "OMPI_COMM_WORLD_SIZE", "SM_OUTPUT_DIR", "NAME",
]  # fmt: skip


def test_the_platforms_own_variables_are_never_flagged(env, monkeypatch):
    assert len(PLATFORM) >= 25
    for name in PLATFORM:
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    env(**REQUIRED)
    assert REQUIRED["DATASET_URI"] == read_settings().DATASET_URI


def test_a_setting_after_another_programs_prefix_is_not_flagged(env, monkeypatch):
    # Not in the platform list: the rule itself leaves them alone (KF_OUTPUT_DIR is 0.9 like OUTPUT_URI).
    for name in ("KF_OUTPUT_DIR", "APP_WORLD_SIZE", "MPI_LOCAL_RANK", "XLA_NNODES"):
        monkeypatch.setenv(name, "1")
    env(**REQUIRED)
    assert read_settings().WORLD_SIZE == 1


def test_misspellings_are_reported_with_every_other_problem(env):
    env(DATASET_URI="gs://b/x", LORA_RANK="8", LERNING_RATE="1e-4", PACKING="maybe")
    fails("LORA_RANK is set", "LERNING_RATE is set", "DATASET_URI (got 'gs://b/x')", "PACKING (got 'maybe')",
          "OUTPUT_URI is required")  # fmt: skip


def test_names_that_are_no_setting_and_no_near_miss_pass(env, monkeypatch):
    """Other programs' lower-case names, and single words too short or too far from a setting's end."""
    for name in ("http_proxy", "no_proxy", "epochs", "RUN", "ID", "EPOCH_COUNT", "MODEL_NAME", "STEP"):
        monkeypatch.setenv(name, "1")
    env(**REQUIRED)
    assert read_settings().NUM_EPOCHS == 1
