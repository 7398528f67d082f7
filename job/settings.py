"""Every environment variable of the job, typed, with its default and what it means.

This is the only module that reads the environment. Precedence: the real environment, then the
file named by ENV_FILE (python-dotenv, never overriding a real variable), then the defaults below,
which follow the Unsloth Llama-3 notebook (unsloth/notebooks, Llama3_(8B)-Alpaca.ipynb). A name in
ENV_FILE that is not a setting, or a near miss of one in the environment (LORA_RANK, EPOCHS, lora_r), is an error.
"""

import difflib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from job.errors import ConfigInvalid, redact

# What determines the trained adapter: the default RUN_ID hashes these (and the dataset's identity, which the
# caller supplies). Every setting is in exactly one of the two sets; a test fails when one is added to neither.
TRAINED = frozenset({
    "BASE_MODEL", "DATASET_FORMAT", "CHAT_TEMPLATE", "TRAIN_ON_RESPONSES_ONLY", "EVAL_FRACTION", "MAX_SEQ_LENGTH",
    "LOAD_IN_4BIT", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGET_MODULES", "LEARNING_RATE",
    "PER_DEVICE_BATCH_SIZE", "GRAD_ACCUM_STEPS", "MAX_STEPS", "NUM_EPOCHS", "WARMUP_STEPS", "WEIGHT_DECAY",
    "LR_SCHEDULER", "OPTIMIZER", "SEED", "PACKING", "TRAIN_BACKEND", "DRY_RUN", "DRY_RUN_STEPS", "WORLD_SIZE",
})  # fmt: skip
# Where the run reads and writes, how it is named, checkpointed, sampled, logged and launched, and credentials.
# DATASET_URI too: the dataset's content identity is hashed instead, so a moved copy is the same run.
NOT_TRAINED = frozenset({
    "DATASET_URI", "OUTPUT_URI", "RUN_ID", "RUN_NAME", "ENV_FILE", "SCRATCH_DIR", "CHECKPOINT_EVERY_STEPS",
    "CHECKPOINT_KEEP", "SAMPLE_PROMPTS_URI", "NUM_SAMPLE_PROMPTS", "MAX_NEW_TOKENS", "LEASE_SECONDS", "RANK",
    "LOCAL_RANK", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "TORCHELASTIC_RUN_ID", "SWEEP_FILE",
    "JOB_COMPLETION_INDEX", "IMAGE_VERSION", "AUTO_BATCH", "EXPORT", "BASE_MODEL_16BIT", "REPORT_TO", "LOG_FORMAT",
    "DATA_WORKERS", "TERMINATION_MESSAGE_PATH", "HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
})  # fmt: skip

# Llama's seven projections; job.model.lora_targets reads them per model (fused layers, experts that are no layers).
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The platform's own variables are never taken for misspelled settings, however close: those of the container
# runtime, Kubernetes, torchrun and the launchers that set its PET_ variables (Kubeflow) or their own (Slurm, MPI,
# SageMaker), CUDA, the libraries the job uses, the CI runners of the dry run (GitHub's RUNNER_NAME), and shells
# (WSL's NAME, the machine's name).
PLATFORM_PREFIXES = (
    "KUBERNETES_", "NVIDIA_", "NV_", "CUDA_", "CUDNN_", "CUBLAS_", "PYTORCH_", "TORCH_", "TORCHELASTIC_", "PET_",
    "NCCL_", "HF_", "HUGGINGFACE_", "AWS_", "TRANSFORMERS_", "TOKENIZERS_", "TRITON_", "UNSLOTH_", "BNB_",
    "ACCELERATE_", "WANDB_", "MLFLOW_", "XDG_", "LC_", "PYTHON", "OMP_", "MKL_", "SLURM_", "OMPI_", "PMI_", "SM_",
    "GITHUB_", "RUNNER_", "ACTIONS_",
)  # fmt: skip
PLATFORM_NAMES = {
    "PATH", "HOME", "HOSTNAME", "TERM", "LANG", "LANGUAGE", "PWD", "OLDPWD", "SHLVL", "USER", "SHELL",
    "LD_LIBRARY_PATH", "LIBRARY_PATH", "TMPDIR", "TZ", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "NAME",
}  # fmt: skip
# Kubernetes service links: FOO_SERVICE_HOST, FOO_SERVICE_PORT(_NAME), FOO_PORT, FOO_PORT_80_TCP(_ADDR, ...).
SERVICE_LINK = re.compile(r"_SERVICE_(HOST|PORT)(_|$)|_PORT(_|$)")
# Words that name a location: OUTPUT_DIR, DATASET_PATH and DATASET_URL all mean the *_URI setting.
LOCATION_WORDS = {"DIR": "URI", "PATH": "URI", "URL": "URI"}
# A Hub repo's OWNER/NAME; Hub datasets: hf://datasets/OWNER/NAME, then optionally /path/in/repo (a file or folder)
# or /SPLIT.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HUB_DATASET = re.compile(rf"hf://datasets/{HUB_ID.pattern}(/\S*)?")
# Required addresses that, set to "", are a mistake rather than "use the default" (there is none, or it is a model).
NOT_EMPTY = ("BASE_MODEL", "DATASET_URI", "OUTPUT_URI")

FIXES = {
    "BASE_MODEL": "set it to a Hub id (org/name), a local model directory or s3://bucket/prefix/",
    "DATASET_URI": "set it to s3://bucket/key, s3://bucket/prefix/, hf://datasets/OWNER/NAME or a local path",
    "OUTPUT_URI": "set it to s3://bucket/prefix or a local directory",
    "SAMPLE_PROMPTS_URI": "set it to s3://bucket/key, hf://datasets/OWNER/NAME/file or a local path, or unset it",
    "LORA_TARGET_MODULES": "give module names separated by commas, e.g. q_proj,v_proj",
    "REPORT_TO": "give none, or any of tensorboard, wandb, mlflow separated by commas",
}


def _default_scratch() -> str:
    # The image mounts a writable /scratch; elsewhere (a laptop, CI) a folder under the temp dir.
    return "/scratch" if os.access("/scratch", os.W_OK) else str(Path(tempfile.gettempdir()) / "finetune-job")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", env_ignore_empty=True)

    # Inputs and outputs
    BASE_MODEL: str = "unsloth/llama-3-8b-bnb-4bit"
    """Hugging Face Hub id, local model directory, or s3://bucket/prefix/ holding a model directory."""
    DATASET_URI: str
    """s3://bucket/key, s3://bucket/prefix/ (every data file under it), hf://datasets/OWNER/NAME[/path or /SPLIT] (a
    Hugging Face Hub dataset; HF_TOKEN for private or gated ones) or a local file or folder."""
    OUTPUT_URI: str
    """s3://bucket/prefix or a local directory; the run writes under OUTPUT_URI/RUN_ID/."""
    RUN_ID: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    """Names the run's folder; default: RUN_NAME- (when set) and a short hash of what is trained and on what data."""
    RUN_NAME: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
    """Readable prefix of the default RUN_ID (RUN_NAME-<hash>); Kubernetes sets the Job's name; ignored with RUN_ID."""
    EXPORT: Literal["none", "merged_16bit"] = "none"
    """What to write beside the adapter: none, or merged_16bit: the adapter merged into the 16-bit base (merged/)."""
    BASE_MODEL_16BIT: str | None = None
    """BASE_MODEL's 16-bit original for EXPORT=merged_16bit when BASE_MODEL holds 4-bit weights (Hub id, folder,
    s3://); derived for unsloth's pre-quantized ids."""
    ENV_FILE: str = ".env"
    """A dotenv file read at start; the real environment wins over it."""
    SCRATCH_DIR: str = Field(default_factory=_default_scratch)
    """Local working folder for downloads, checkpoints and outputs before upload."""

    # Data
    DATASET_FORMAT: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    """Row format; auto detects it from the columns and logs what it chose."""
    CHAT_TEMPLATE: Literal["auto", "alpaca", "chatml", "llama3", "qwen3", "gemma3", "mistral", "phi4", "gptoss"] = (
        "auto"
    )
    """auto: the tokenizer's own template, else alpaca for instruction data and chatml for chats; a name: that one."""
    TRAIN_ON_RESPONSES_ONLY: bool = True
    """Leave prompt tokens out of the loss."""
    EVAL_FRACTION: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of rows held out for eval loss."""
    MAX_SEQ_LENGTH: int = Field(default=2048, ge=16)
    """Tokens per training sequence; longer rows are truncated."""

    # Model and LoRA
    LOAD_IN_4BIT: bool = True
    """Load the base model in bitsandbytes NF4 (QLoRA); false trains 16-bit LoRA."""
    LORA_R: int = Field(default=16, ge=1)
    """LoRA rank; at most the narrowest width of the LORA_TARGET_MODULES layers (read from config.json)."""
    LORA_ALPHA: int = Field(default=16, ge=1)
    """LoRA scaling numerator."""
    LORA_DROPOUT: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA path."""
    LORA_TARGET_MODULES: Annotated[list[str], NoDecode] = Field(default=DEFAULT_LORA_TARGETS, min_length=1)
    """Comma-separated names of the linear layers that get adapters. The default's fused equivalents where a model
    joins them (Phi-3 and microsoft/phi-4: qkv_proj, gate_up_proj)."""

    # Training
    LEARNING_RATE: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""
    PER_DEVICE_BATCH_SIZE: int = Field(default=2, ge=1)
    """Sequences per GPU per forward pass."""
    GRAD_ACCUM_STEPS: int = Field(default=4, ge=1)
    """Forward passes per optimizer step."""
    MAX_STEPS: int = Field(default=60, ge=0)
    """Optimizer steps (default 60); unset it and set NUM_EPOCHS to train by epochs (MAX_STEPS then becomes 0)."""
    NUM_EPOCHS: float = Field(default=1.0, gt=0)
    """Epochs to train when it is set and MAX_STEPS is not (or MAX_STEPS is 0)."""
    WARMUP_STEPS: int = Field(default=5, ge=0)
    """Linear warm-up steps."""
    WEIGHT_DECAY: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    LR_SCHEDULER: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"] = "linear"
    """Learning-rate schedule after warm-up."""
    OPTIMIZER: Literal["adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"] = (
        "adamw_8bit"
    )
    """Optimizer; the 8-bit ones need bitsandbytes and a GPU."""
    SEED: int = 3407
    """Seed for shuffling, the eval split, LoRA init and training."""
    PACKING: bool = True
    """Pack rows into sequences of up to MAX_SEQ_LENGTH tokens, each row attending only to itself; MAX_STEPS then
    counts batches of packed sequences. false: one row per sequence, padded."""
    AUTO_BATCH: bool = True
    """On a GPU, pick the micro-batch, accumulation and activation checkpointing that fit its free memory, keeping
    PER_DEVICE_BATCH_SIZE x GRAD_ACCUM_STEPS; false: exactly as given."""
    CHECKPOINT_EVERY_STEPS: int = Field(default=50, ge=0)
    """Save a checkpoint every N optimizer steps; 0 disables."""
    CHECKPOINT_KEEP: int = Field(default=2, ge=1)
    """Committed checkpoints kept under OUTPUT_URI/RUN_ID/checkpoints/; older ones go once a newer one is committed."""

    # Samples
    SAMPLE_PROMPTS_URI: str | None = None
    """JSONL of prompts to sample after training (s3://, hf://datasets/ or local); unset: prompts from held-out rows."""
    NUM_SAMPLE_PROMPTS: int = Field(default=5, ge=0)
    """How many held-out rows to sample when SAMPLE_PROMPTS_URI is unset."""
    MAX_NEW_TOKENS: int = Field(default=128, ge=1)
    """Longest generated response per sample."""

    # Run
    TRAIN_BACKEND: Literal["auto", "unsloth", "hf"] = "auto"
    """auto: unsloth when CUDA is present, else hf (transformers + peft)."""
    DRY_RUN: bool = False
    """Run every stage on CPU with a tiny model for DRY_RUN_STEPS steps."""
    DRY_RUN_STEPS: int = Field(default=3, ge=1)
    """Training steps in a dry run."""
    LEASE_SECONDS: int = Field(default=60, ge=2, le=300)
    """One attempt writes a run at a time: it renews its hold every LEASE_SECONDS/4 and stops (75) when it could not
    for LEASE_SECONDS/2; a hold left LEASE_SECONDS is taken over. At most 300: other ranks wait for the lease in a
    collective, which NCCL gives up after 600 s."""
    REPORT_TO: Annotated[list[Literal["none", "tensorboard", "wandb", "mlflow"]], NoDecode] = ["none"]
    """Comma list. tensorboard: event files published in OUTPUT_URI/RUN_ID/tensorboard/; wandb, mlflow: their runs,
    named RUN_ID, configured by their own variables (WANDB_*, MLFLOW_*)."""
    LOG_FORMAT: Literal["auto", "json", "text"] = "auto"
    """json: one JSON object per line; text: readable lines and progress bars; auto: json unless a terminal."""
    IMAGE_VERSION: str | None = None
    """Set by the image build; recorded in manifest.json."""
    TERMINATION_MESSAGE_PATH: str = "/dev/termination-log"
    """Where a failure's one line goes when the file exists: Kubernetes' terminationMessagePath (give the same path
    here when the pod spec changes it)."""

    # Scale
    DATA_WORKERS: int | None = Field(default=None, ge=1)
    """Processes that tokenize the rows, at most; unset: the CPUs the container may use (its CPU affinity and
    limit). k8s/base sets it to the pod's CPU request, since a pod without a CPU limit sees every core of the node."""
    NPROC_PER_NODE: str = "1"
    """gpu or a number; above 1 the job runs torchrun itself, forwards SIGTERM, and exits with rank 0's code."""
    NNODES: int = Field(default=1, ge=1)
    """Nodes in the run; above 1 each node's job starts torchrun, which meets the others at RDZV_ENDPOINT."""
    NODE_RANK: int = Field(default=0, ge=0)
    """This node's index, 0 to NNODES-1."""
    RDZV_ENDPOINT: str | None = Field(default=None, pattern=r"^\S+:[0-9]{1,5}$")
    """host:port of node 0's rendezvous; required when NNODES is above 1."""
    RANK: int = Field(default=0, ge=0)
    """Set by torchrun: this process's rank; rank 0 alone reads the dataset and writes outputs."""
    LOCAL_RANK: int = Field(default=0, ge=0)
    """Set by torchrun: this process's GPU on its node."""
    WORLD_SIZE: int = Field(default=1, ge=1)
    """Set by torchrun: processes (GPUs) in the run."""
    TORCHELASTIC_RUN_ID: str | None = None
    """Set by torchrun in the processes it starts, which therefore never start torchrun again."""
    SWEEP_FILE: str | None = None
    """JSON lines of variable overrides; line JOB_COMPLETION_INDEX configures this run (an Indexed Job sweep)."""
    JOB_COMPLETION_INDEX: int | None = Field(default=None, ge=0)
    """Set by Kubernetes for Indexed Jobs: picks the SWEEP_FILE line."""

    # Credentials and endpoints (standard meanings; boto3 and huggingface_hub read them too)
    HF_TOKEN: SecretStr | None = None
    """Hugging Face token for gated or private models and hf:// datasets."""
    AWS_ACCESS_KEY_ID: SecretStr | None = None
    """S3 access key; unset: boto3's default chain (IRSA, instance profile, ~/.aws)."""
    AWS_SECRET_ACCESS_KEY: SecretStr | None = None
    """S3 secret key."""
    AWS_SESSION_TOKEN: SecretStr | None = None
    """Temporary-credential session token."""
    AWS_REGION: str | None = None
    """S3 region."""
    AWS_DEFAULT_REGION: str | None = None
    """S3 region when AWS_REGION is unset."""
    AWS_ENDPOINT_URL_S3: str | None = Field(default=None, pattern=r"^https?://")
    """Endpoint of an S3-compatible store (MinIO, Ceph, ...)."""
    AWS_ENDPOINT_URL: str | None = Field(default=None, pattern=r"^https?://")
    """Endpoint for every AWS service, used when AWS_ENDPOINT_URL_S3 is unset."""

    @field_validator("LORA_TARGET_MODULES", "REPORT_TO", mode="before")
    @classmethod
    def _split_commas(cls, value):
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @field_validator("DATASET_URI", "OUTPUT_URI", "BASE_MODEL", "SAMPLE_PROMPTS_URI", "BASE_MODEL_16BIT")
    @classmethod
    def _check_address(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if value.startswith("file://"):
            value = value.removeprefix("file://")  # file:///data/x is the local path /data/x
        elif value.lower().startswith("hf:") and info.field_name in ("DATASET_URI", "SAMPLE_PROMPTS_URI"):
            if not HUB_DATASET.fullmatch(value):
                raise ValueError("give hf://datasets/OWNER/NAME, then optionally /path/in/repo or /SPLIT")
            return value
        elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", value) and not re.match(r"s3://[A-Za-z0-9._-]+(/|$)", value):
            # Another scheme (gs://, https://, hf://), s3 misspelled (S3://x, s3:/x, s3:bucket), or no bucket.
            if re.match(r"s3://(/|$)", value):
                raise ValueError("an s3:// address needs a bucket name")
            raise ValueError("is neither s3://bucket/... (lower-case s3, two slashes) nor a local path")
        if not value.strip():
            raise ValueError("is set but empty")
        if info.field_name == "OUTPUT_URI" and Path(value).is_file():
            raise ValueError("is a file: give a directory")
        return value

    @field_validator("NPROC_PER_NODE", mode="before")
    @classmethod
    def _check_nproc(cls, value) -> str:
        value = str(value).strip().lower()
        if value != "gpu" and not re.fullmatch(r"[1-9][0-9]*", value):
            raise ValueError("give gpu (one process per GPU) or a positive number of processes")
        return value

    @model_validator(mode="after")
    def _check_together(self) -> "Settings":
        given, problems = self.model_fields_set, []
        if "NUM_EPOCHS" in given and "MAX_STEPS" not in given:
            self.MAX_STEPS = 0  # train by epochs
        elif "NUM_EPOCHS" in given and self.MAX_STEPS > 0:
            problems.append(
                f"MAX_STEPS={self.MAX_STEPS} and NUM_EPOCHS={self.NUM_EPOCHS:g} are both set: "
                "set only one (MAX_STEPS to train by steps, NUM_EPOCHS to train by epochs)"
            )
        if self.NNODES > 1 and not self.RDZV_ENDPOINT:
            problems.append(
                f"RDZV_ENDPOINT is required when NNODES={self.NNODES}: set it to host:port of node 0's rendezvous"
            )
        if self.NODE_RANK >= self.NNODES:
            problems.append(f"NODE_RANK={self.NODE_RANK} with NNODES={self.NNODES}: number the nodes 0 to NNODES-1")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def trained(self) -> dict:
        """The settings that determine the trained adapter (TRAINED), as JSON values."""
        return self.model_dump(mode="json", include=TRAINED)

    def run_id(self, dataset: list[dict]) -> str:
        """RUN_ID, else a short hash of what is trained and the dataset's identity, after RUN_NAME- when set."""
        if self.RUN_ID:
            return self.RUN_ID
        identity = json.dumps({"settings": self.trained(), "dataset": dataset}, sort_keys=True)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        return f"{self.RUN_NAME}-{digest}" if self.RUN_NAME else digest

    def effective(self) -> "Settings":
        """The settings the run uses: a dry run trains DRY_RUN_STEPS steps in 32-bit on CPU with the hf backend."""
        if not self.DRY_RUN:
            return self
        dry = {
            "TRAIN_BACKEND": "hf",
            "LOAD_IN_4BIT": False,
            "OPTIMIZER": "adamw_torch",
            "MAX_STEPS": self.DRY_RUN_STEPS,
            # Warm-up at most a quarter of the steps: 5 warm-up steps in a 3-step run gave lr 0, 4e-5, 8e-5.
            "WARMUP_STEPS": min(self.WARMUP_STEPS, self.DRY_RUN_STEPS // 4),
        }
        return self.model_copy(update=dry)

    def public(self) -> dict:
        """The configuration with secrets masked, for config.json and the report (the caller adds RUN_ID)."""
        return self.model_dump(mode="json")


def _describe(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a check of several settings together; its message names them
        return message
    name = str(error["loc"][0])
    if error["type"] == "missing":
        return f"{name} is required: {FIXES.get(name, 'set it')}"
    value = error["input"]
    secret = "SecretStr" in str(Settings.model_fields[name].annotation)
    shown = "" if secret else f" (got {redact(value) if isinstance(value, str) else value!r})"
    return f"{name}{shown}: {message}" + (f"; {FIXES[name]}" if name in FIXES else "")


def _is_platform(name: str) -> bool:
    name = name.upper()
    return name in PLATFORM_NAMES or name.startswith(PLATFORM_PREFIXES) or bool(SERVICE_LINK.search(name))


def _words(name: str) -> list[str]:
    return [LOCATION_WORDS.get(word, word) for word in name.upper().split("_") if word]


def _is_near_miss(name: str, setting: str) -> bool:
    """Whether `name` looks like a misspelling of `setting`."""
    a, b = _words(name), _words(setting)
    letters_a, letters_b = "".join(a), "".join(b)
    if len(letters_a) > len(letters_b) and letters_a.endswith(letters_b):
        return False  # a setting's name after a prefix is how other programs name theirs: LOCAL_WORLD_SIZE, PET_NNODES
    if letters_a == letters_b:  # case and underscores: LEARNINGRATE, BASEMODEL, LORA_DROP_OUT, OUTPUT_DIR
        return True
    # Each word cut short or run on, in names of 4 letters or more: LORA_RANK, MAX_SEQ_LEN, OPTIM, NUM_EPOCH.
    if (
        len(a) == len(b)
        and min(len(letters_a), len(letters_b)) >= 4
        and all(x.startswith(y) or y.startswith(x) for x, y in zip(a, b))
    ):
        return True
    # Two or more words in common, with words missing at either end or added at the end: BATCH_SIZE,
    # LR_SCHEDULER_TYPE. Not words added at the start: that is how platforms name theirs (LOCAL_WORLD_SIZE).
    common = min(len(a), len(b))
    if common >= 2 and (a[:common] == b[:common] or (len(a) < len(b) and a == b[-common:])):
        return True
    # One word of 4 letters or more, the setting without its first word: EPOCHS, STEPS, MODEL.
    if a == b[1:] and len(letters_a) >= 4:
        return True
    # A slip of the keyboard: 0.85 allows one letter missing or added (LERNING_RATE, NODES), or one wrong in
    # names of 7 letters or more (DATASET_FORMAY); in shorter names a wrong letter mostly makes another word.
    slip = difflib.SequenceMatcher(None, letters_a, letters_b)
    return slip.quick_ratio() >= 0.85 and slip.ratio() >= 0.85  # quick_ratio, a cheap upper bound, first


def _closest(name: str) -> str | None:
    """The setting that `name` most likely misspells, or None."""
    near = [setting for setting in Settings.model_fields if _is_near_miss(name, setting)]
    return max(near, key=lambda s: difflib.SequenceMatcher(None, name.upper(), s).ratio(), default=None)


def _misspelled(env_file: str, from_file: dict) -> list[str]:
    """A problem for each name in the env file that is not a setting, and each near miss in the environment."""
    problems = []
    for name in from_file:
        if name not in Settings.model_fields and not _is_platform(name):
            close = _closest(name)
            hint = f"did you mean {close}?" if close else "it is unknown: use names from env.example"
            problems.append(f"{name} in {env_file} is not a setting: {hint}")
    # Upper-case names, and others only when they are a setting in another case (lora_r): other names follow other
    # conventions (http_proxy, GitHub's ImageVersion).
    for name in sorted(os.environ.keys() - Settings.model_fields.keys() - from_file.keys()):
        cased = name.isupper() or name.upper() in Settings.model_fields
        if cased and not _is_platform(name) and (close := _closest(name)):
            problems.append(f"{name} is set but is not a setting: did you mean {close}? rename or unset it")
    return problems


def read_settings() -> Settings:
    """Reads the environment and ENV_FILE; raises ConfigInvalid listing every problem at once."""
    env_file = os.environ.get("ENV_FILE") or ".env"
    if os.environ.get("ENV_FILE") and not Path(env_file).is_file():
        raise ConfigInvalid(f"ENV_FILE={env_file!r} does not exist: point it at a dotenv file or unset it")
    from_file = dotenv_values(env_file) if Path(env_file).is_file() else {}
    problems = _misspelled(env_file, from_file)
    for name, value in from_file.items():  # the real environment wins; misspelled names stay out
        if value is not None and (name in Settings.model_fields or _is_platform(name)):
            os.environ.setdefault(name, value)
    empty = [name for name in NOT_EMPTY if os.environ.get(name) == ""]  # other blanks reach the validator
    for name in empty:
        fix = "unset it for the default, or name a model" if name == "BASE_MODEL" else FIXES[name]
        problems.append(f"{name} is set but empty: {fix}")
    settings, failed = None, set(empty)
    try:
        settings = Settings()
        if settings.SWEEP_FILE:
            settings = Settings(**sweep_point(settings.SWEEP_FILE, settings.JOB_COMPLETION_INDEX))
        settings = settings.effective()
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems += [_describe(e) for e in errors if not (e["type"] == "missing" and e["loc"][0] in empty)]
        failed |= {e["loc"][0] for e in errors if e["loc"]}
        settings = None
    if problems:
        error = ConfigInvalid("; ".join(problems))
        error.settings = settings or _salvage(failed)
        raise error
    return settings


def _salvage(failed: set[str]) -> Settings | None:
    """The settings with every variable that failed at its default (a required one at a placeholder), so that
    failure.json reaches OUTPUT_URI/RUN_ID/; None when one of those two failed, or this fails too."""
    if failed & {"OUTPUT_URI", "RUN_ID"}:
        return None
    fields = Settings.model_fields
    try:
        return Settings(**{name: "-" if fields[name].is_required() else fields[name].default for name in failed})
    except ValidationError:
        return None


def sweep_point(path: str, index: int | None) -> dict:
    """Line `index` of a JSON-lines file of overrides; it wins over the environment."""
    if index is None:
        raise ConfigInvalid("SWEEP_FILE is set but JOB_COMPLETION_INDEX is not: run it as an Indexed Job, or set it")
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigInvalid(f"SWEEP_FILE={path}: cannot be read ({exc.strerror}): mount the sweep there") from None
    if index >= len(lines):
        raise ConfigInvalid(
            f"JOB_COMPLETION_INDEX={index}: SWEEP_FILE has {len(lines)} configurations: lower the Job's completions"
        )
    try:
        point = json.loads(lines[index])
    except json.JSONDecodeError as exc:
        raise ConfigInvalid(f"SWEEP_FILE={path}:{index + 1}: invalid JSON ({exc.msg}): fix the line") from None
    unknown = sorted(set(point) - set(Settings.model_fields)) if isinstance(point, dict) else ["(not an object)"]
    if unknown:
        raise ConfigInvalid(f"SWEEP_FILE={path}:{index + 1}: unknown variables {unknown}: use names from env.example")
    return point
