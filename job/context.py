"""The run's context, decided once in entrypoint.main(): where it reads and writes, on what device, as
which rank. Stages take it instead of asking the environment, torch or the trainer again.

Output layout under OUTPUT_URI/RUN_ID/ (README, Outputs): the names below are the only spelling of it.
"""

from dataclasses import dataclass
from pathlib import Path

from job.storage import join

MANIFEST = "manifest.json"  # written last: the run is complete exactly when it exists
FAILURE = "failure.json"
CONFIG = "config.json"
ATTEMPTS = "attempts.json"  # every attempt of the run: when it started, the step it resumed from
LEASE = "lease.json"  # held by the one attempt that trains and publishes; removed when it stops
CHECKPOINTS = "checkpoints"  # step-N/ folders, each committed by its MARKER written last
MARKER = "COMMITTED.json"
ADAPTER = "adapter"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD = "tensorboard"  # REPORT_TO=tensorboard: event files, carried in each checkpoint across attempts


@dataclass(frozen=True)
class Device:
    """The machine's answer, asked once: CUDA (never in a dry run), bf16, and this process's ranks."""

    cuda: bool
    bf16: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def rank_zero(self) -> bool:
        """Under torchrun, rank 0 alone reads the dataset, talks to the output and publishes."""
        return self.rank == 0

    @property
    def local_zero(self) -> bool:
        """One process per node fetches what every rank of that node reads from disk (the base model)."""
        return self.local_rank == 0

    @classmethod
    def detect(cls, settings) -> "Device":
        import torch

        cuda = torch.cuda.is_available() and not settings.DRY_RUN
        bf16 = cuda and torch.cuda.is_bf16_supported()
        return cls(cuda, bf16, settings.RANK, settings.LOCAL_RANK, settings.WORLD_SIZE)


@dataclass(frozen=True)
class Run:
    """One run: its id, its folder in OUTPUT_URI and in SCRATCH_DIR, its device and backend."""

    id: str
    out: str
    scratch: Path
    device: Device
    backend: str
    dry_run: bool

    @classmethod
    def build(cls, settings, run_id: str, device: Device, backend: str) -> "Run":
        return cls(run_id, join(settings.OUTPUT_URI, run_id), Path(settings.SCRATCH_DIR) / run_id, device, backend,
                   settings.DRY_RUN)  # fmt: skip

    def uri(self, *parts: str) -> str:
        """An address under the run's folder in OUTPUT_URI."""
        return join(self.out, *parts)

    @property
    def stage(self) -> Path:
        """What publish uploads: the adapter, samples, metrics, report."""
        return self.scratch / "output"

    @property
    def checkpoints(self) -> Path:
        """The trainer's output_dir: checkpoint-N folders before they are uploaded, and the one resumed from."""
        return self.scratch / "checkpoints"
