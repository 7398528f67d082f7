"""Several processes from one container: with NPROC_PER_NODE above 1 (or `gpu`), or NNODES above 1, the job
starts torchrun itself, in this process, and exits with its ranks' classified code (the lowest failed rank's),
so that 65, 70, 78 and 143 reach Kubernetes' podFailurePolicy; torchrun's own command exits 1
whatever its ranks exit with. Each failing rank writes its code to torchrun's error file (TORCHELASTIC_ERROR_FILE),
so the code survives a rank that torchrun stops or that aborts on its way out. SIGTERM and SIGINT reach every rank
through torchrun alone (it starts each in a session of its own, out of the terminal's reach), which waits for them to
commit their checkpoint (up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default); it passes a second Ctrl-C on as
SIGTERM, which after a SIGINT stops the ranks at once (preemption).

Nodes meet at a static rendezvous: node 0 hosts it and node ranks are the Job's completion indexes. Unlike c10d's,
it is not read again once the ranks start, so a node that leaves first (its ranks failed) takes nothing from the
others, which exit with their own ranks' code."""

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENTRYPOINT = Path(__file__).resolve().parents[1] / "entrypoint.py"


def wanted(settings) -> bool:
    """True in the container's own process when more than one rank is asked for; never inside torchrun."""
    return settings.TORCHELASTIC_RUN_ID is None and (settings.NPROC_PER_NODE != "1" or settings.NNODES > 1)


def arguments(settings) -> list[str]:
    """torchrun's command line for the settings (k8s/multi-gpu and k8s/multi-node set them)."""
    args = [f"--nproc-per-node={settings.NPROC_PER_NODE}", f"--nnodes={settings.NNODES}"]
    if settings.NNODES == 1:
        args.append("--standalone")
    else:  # node 0 hosts the rendezvous; every node of the run names the same id
        rdzv_id = settings.RUN_ID or settings.RUN_NAME or "finetune-job"
        args += [f"--node-rank={settings.NODE_RANK}", "--rdzv-backend=static",
                 f"--rdzv-endpoint={settings.RDZV_ENDPOINT}", f"--rdzv-id={rdzv_id}"]  # fmt: skip
    return [*args, str(ENTRYPOINT)]


def torchrun(settings) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    log.info("starting torchrun %s", " ".join(arguments(settings)))
    try:
        run(parse_args(arguments(settings)))
        return 0
    except ChildFailedError as exc:
        return exit_code(exc.failures)
    except SignalException as exc:  # torchrun passed the signal to the ranks and waited for them
        return 128 + int(exc.sigval)


def exit_code(failures: dict) -> int:
    """The ranks' classified code: the lowest rank's that reported its own failure (143 is torchrun stopping a rank
    after another failed); else, from ranks that reported nothing (killed, aborted), the lowest rank's exit status."""
    messages = {rank: f.error_file_data.get("message") for rank, f in failures.items()}
    reported = {rank: message.get("errorCode") for rank, message in messages.items() if isinstance(message, dict)}
    status = {rank: f.exitcode if f.exitcode > 0 else 128 - f.exitcode for rank, f in failures.items()}  # -6: 134
    for codes in (reported, status):
        own = {rank: code for rank, code in codes.items() if code not in (None, 143)}
        if own:
            return own[min(own)]
    return 143


def report(code: int, message: str) -> None:
    """In a rank that torchrun started: its failure, in the error file torchrun reads back (the format of its
    ErrorHandler, plus errorCode), for exit_code above."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        error = {"message": message, "errorCode": code, "extraInfo": {"timestamp": str(int(time.time()))}}
        Path(path).write_text(json.dumps({"message": error}))
