"""Every environment variable of the job, typed, with its default and what it means.

This is the only module that reads the environment. Precedence: the real environment, then the
file named by ENV_FILE (python-dotenv, never overriding a real variable), then the defaults below,
which follow the Unsloth Llama-3 notebook (unsloth/notebooks, Llama3_(8B)-Alpaca.ipynb).
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from dotenv import load_dotenv
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from job.errors import ConfigInvalid

# Variables that do not change what is trained, so they stay out of the default RUN_ID.
NOT_IN_RUN_ID = {
    "RUN_ID", "ENV_FILE", "SCRATCH_DIR", "LOG_FORMAT", "IMAGE_VERSION", "RANK", "LOCAL_RANK", "SWEEP_FILE",
    "JOB_COMPLETION_INDEX", "HF_TOKEN", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
}  # fmt: skip

FIXES = {
    "DATASET_URI": "set it to s3://bucket/key, s3://bucket/prefix/ or a local path",
    "OUTPUT_URI": "set it to s3://bucket/prefix or a local directory",
    "LORA_TARGET_MODULES": "give module names separated by commas, e.g. q_proj,v_proj",
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
    """s3://bucket/key, s3://bucket/prefix/ (every data file under it) or a local file or folder."""
    OUTPUT_URI: str
    """s3://bucket/prefix or a local directory; the run writes under OUTPUT_URI/RUN_ID/."""
    RUN_ID: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    """Names the run's folder; default: a short hash of the effective configuration."""
    ENV_FILE: str = ".env"
    """A dotenv file read at start; the real environment wins over it."""
    SCRATCH_DIR: str = Field(default_factory=_default_scratch)
    """Local working folder for downloads, checkpoints and outputs before upload."""

    # Data
    DATASET_FORMAT: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    """Row format; auto detects it from the columns and logs what it chose."""
    CHAT_TEMPLATE: Literal["auto", "alpaca", "chatml"] = "auto"
    """auto: the tokenizer's own template, else alpaca for instruction data and chatml for chats."""
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
    """LoRA rank."""
    LORA_ALPHA: int = Field(default=16, ge=1)
    """LoRA scaling numerator."""
    LORA_DROPOUT: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA path."""
    LORA_TARGET_MODULES: Annotated[list[str], NoDecode] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )
    """Comma-separated names of the linear layers that get adapters."""

    # Training
    LEARNING_RATE: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""
    PER_DEVICE_BATCH_SIZE: int = Field(default=2, ge=1)
    """Sequences per GPU per forward pass."""
    GRAD_ACCUM_STEPS: int = Field(default=4, ge=1)
    """Forward passes per optimizer step."""
    MAX_STEPS: int = Field(default=60, ge=0)
    """Optimizer steps; 0 means train NUM_EPOCHS epochs."""
    NUM_EPOCHS: float = Field(default=1.0, gt=0)
    """Epochs, used when MAX_STEPS is 0."""
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
    PACKING: bool = False
    """Pack several rows into each sequence."""
    CHECKPOINT_EVERY_STEPS: int = Field(default=50, ge=0)
    """Save a checkpoint every N optimizer steps; 0 disables."""

    # Samples
    SAMPLE_PROMPTS_URI: str | None = None
    """JSONL of prompts to sample after training; unset: prompts from held-out rows."""
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
    RANK: int = Field(default=0, ge=0)
    """Set by torchrun: this process's rank; rank 0 alone reads the dataset and writes outputs."""
    LOCAL_RANK: int = Field(default=0, ge=0)
    """Set by torchrun: this process's GPU on its node."""
    WORLD_SIZE: int = Field(default=1, ge=1)
    """Set by torchrun: processes (GPUs) in the run."""
    SWEEP_FILE: str | None = None
    """JSON lines of variable overrides; line JOB_COMPLETION_INDEX configures this run (an Indexed Job sweep)."""
    JOB_COMPLETION_INDEX: int | None = Field(default=None, ge=0)
    """Set by Kubernetes for Indexed Jobs: picks the SWEEP_FILE line."""
    IMAGE_VERSION: str | None = None
    """Set by the image build; recorded in manifest.json."""
    LOG_FORMAT: Literal["auto", "json", "text"] = "auto"
    """json: one JSON object per line; text: readable lines and progress bars; auto: json unless a terminal."""

    # Credentials and endpoints (standard meanings; boto3 and huggingface_hub read them too)
    HF_TOKEN: SecretStr | None = None
    """Hugging Face token for gated or private models."""
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

    @field_validator("LORA_TARGET_MODULES", mode="before")
    @classmethod
    def _split_commas(cls, value):
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @field_validator("DATASET_URI", "OUTPUT_URI", "BASE_MODEL", "SAMPLE_PROMPTS_URI")
    @classmethod
    def _check_uri(cls, value):
        if value is not None and value.startswith("s3://") and not value[5:].split("/")[0]:
            raise ValueError("an s3:// address needs a bucket name")
        return value

    def run_id(self) -> str:
        if self.RUN_ID:
            return self.RUN_ID
        effective = self.model_dump(mode="json", exclude=NOT_IN_RUN_ID)
        return hashlib.sha256(json.dumps(effective, sort_keys=True).encode()).hexdigest()[:12]

    def effective(self) -> "Settings":
        """The settings the run uses: a dry run trains DRY_RUN_STEPS steps in 32-bit on CPU with the hf backend."""
        if not self.DRY_RUN:
            return self
        dry = {
            "TRAIN_BACKEND": "hf",
            "LOAD_IN_4BIT": False,
            "OPTIMIZER": "adamw_torch",
            "MAX_STEPS": self.DRY_RUN_STEPS,
        }
        return self.model_copy(update=dry)

    def public(self) -> dict:
        """The effective configuration with secrets masked, for config.json and the report."""
        return self.model_dump(mode="json") | {"RUN_ID": self.run_id()}


def _describe(error: dict) -> str:
    name = str(error["loc"][0]) if error["loc"] else "configuration"
    secret = Settings.model_fields.get(name) and "SecretStr" in str(Settings.model_fields[name].annotation)
    if error["type"] == "missing":
        return f"{name} is required: {FIXES.get(name, 'set it')}"
    shown = "" if secret else f" (got {error['input']!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{name}{shown}: {message}" + (f"; {FIXES[name]}" if name in FIXES else "")


def read_settings() -> Settings:
    """Reads the environment and ENV_FILE; raises ConfigInvalid listing every problem at once."""
    env_file = os.environ.get("ENV_FILE") or ".env"
    if os.environ.get("ENV_FILE") and not Path(env_file).is_file():
        raise ConfigInvalid(f"ENV_FILE={env_file!r} does not exist: point it at a dotenv file or unset it")
    load_dotenv(env_file, override=False)
    try:
        settings = Settings()
        if settings.SWEEP_FILE:
            settings = Settings(**sweep_point(settings.SWEEP_FILE, settings.JOB_COMPLETION_INDEX))
        return settings.effective()
    except ValidationError as exc:
        raise ConfigInvalid("; ".join(_describe(e) for e in exc.errors(include_url=False))) from None


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
