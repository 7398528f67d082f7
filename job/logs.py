"""Log lines and progress bars: JSON lines for log collectors, readable text with tqdm bars for people."""

import json
import logging
import os
import sys
import time
from contextlib import contextmanager

from tqdm.auto import tqdm

from job.errors import redact

_state = {"stage": "start", "json": True}
# When the job's process started, near enough: the entry point imports this module before anything heavy.
STARTED = time.time()


class _StageFilter(logging.Filter):
    def filter(self, record):
        record.stage = _state["stage"] if _state.get("rank") is None else f"{_state['stage']}, rank {_state['rank']}"
        return True


# Library warnings that the job's tests disprove, which would send a user hunting for a fault that is not there.
DISPROVED = (
    # TRL, for any attention but flash-attn's. transformers 5.17 keeps packed rows apart from position_ids alone (SDPA
    # with a block-diagonal mask), unsloth with its varlen or block-diagonal kernels; the log names the kernel
    # ("attention: ..."). tests/test_packing.py trains packed rows as if alone and measures each family's isolation
    # (gpt-oss mixes them, and trains unpacked: kernels.MIXES_PACKED_ROWS); tests/test_kernels.py records the mask.
    "Padding-free training is enabled, but the attention implementation is not set to a supported Flash",
    "You are using packing, but the attention implementation is not set to a supported Flash",
)


class _Disproved(logging.Filter):
    def filter(self, record):
        return not (record.levelno == logging.WARNING and any(text in record.getMessage() for text in DISPROVED))


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        line = {"time": round(record.created, 3), "level": record.levelname.lower(), "stage": record.stage}
        line["message"] = record.getMessage()
        line |= getattr(record, "fields", {})
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str))


class _TextFormatter(logging.Formatter):
    def format(self, record):
        return redact(super().format(record))


class _Library(logging.Logger):
    """The logger of a library that gives itself a stderr handler when imported (transformers, datasets,
    huggingface_hub), and may stop propagating (transformers): each of its lines came out twice in JSON mode, plain
    then JSON (huggingface_hub's "Retrying in 8s [Retry 5/5]"), or plain only. This one keeps no handler and always
    propagates, so that the job's handler writes each line once, in the chosen format."""

    def addHandler(self, handler):
        pass

    propagate = property(lambda self: True, lambda self, value: None)


class _AboveBars(logging.StreamHandler):
    """Text lines written above the progress bars (tqdm.write), so that a bar is never cut in two."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def setup(log_format: str, rank: int | None = None) -> None:
    """log_format: json, text, or auto (json unless stderr is a terminal). Under torchrun (rank given),
    lines carry the rank, and ranks other than 0 log warnings and errors only."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    _state["json"] = use_json
    if use_json:  # datasets' and the Hub's own bars (map, weight loading) would interleave with the JSON lines
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler(sys.stderr) if use_json else _AboveBars(sys.stderr)
    handler.addFilter(_StageFilter())
    handler.addFilter(_Disproved())
    fmt = "%(asctime)s %(levelname)s [%(stage)s] %(message)s"
    handler.setFormatter(_JsonFormatter() if use_json else _TextFormatter(fmt, "%H:%M:%S"))
    _state["rank"] = rank
    logging.basicConfig(level=logging.INFO if not rank else logging.WARNING, handlers=[handler], force=True)
    logging.captureWarnings(True)  # warnings.warn's lines through the handler too, not as plain text beside it
    # Made before the libraries are imported (the entry point imports none of them at the top), so they take these.
    logging.setLoggerClass(_Library)
    for name in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name)
    logging.setLoggerClass(logging.Logger)
    # Libraries log through their own loggers; keep their chatter to warnings. accelerate's info lines are advice to
    # the trainer's authors, such as "The used dataset had no length, returning gathered tensors. You should drop the
    # remainder yourself.", at each of TRL's metric gathers in the last step of a resumed epoch (accelerate 1.15's
    # SkipBatchSampler has no batch_size, so the loader knows no remainder; only those logged metrics are affected).
    for name in (
        "transformers",
        "datasets",
        "accelerate",
        "peft",
        "trl",
        "botocore",
        "boto3",
        "urllib3",
        "httpx",
        "filelock",
        "matplotlib",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)


def current_stage() -> str:
    return _state["stage"]


def is_json() -> bool:
    return _state["json"]


def progress(disable: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar in text mode; silent in JSON mode, where stages log their own numbers."""
    return tqdm(disable=_state["json"] if disable is None else disable, file=sys.stderr, **kwargs)


@contextmanager
def stage(name: str, timings: dict):
    """Marks log lines with the stage and records its seconds in timings."""
    _state["stage"] = name
    start = time.perf_counter()
    logging.getLogger("job").info("%s: started", name)
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)
        logging.getLogger("job").info("%s: %.1f s", name, timings[name], extra={"fields": {"seconds": timings[name]}})
