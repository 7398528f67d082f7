"""torchrun support: every rank trains; rank 0 alone reads the dataset and writes the outputs, and
shares what it read (or the error it met) with the other ranks, so that they all exit alike."""

import logging
from pathlib import Path

from job.context import Device

log = logging.getLogger(__name__)


def setup(device: Device) -> None:
    """Joins the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR); one GPU per rank."""
    if device.world_size == 1:
        return
    import torch
    import torch.distributed as dist

    if device.cuda:
        torch.cuda.set_device(device.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.cuda else "gloo")
    log.info("rank %d of %d (local rank %d)", device.rank, device.world_size, device.local_rank)


def share(device: Device, produce):
    """produce() run on rank 0, its result (or the exception it raised) handed to every rank."""
    if device.world_size == 1:
        return produce()
    import torch.distributed as dist

    box = [None]
    if device.rank_zero:
        try:
            box[0] = (produce(), None)
        except Exception as exc:  # re-raised on every rank below
            box[0] = (None, exc)
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def together(device: Device, produce, here: bool) -> None:
    """produce() on the ranks where `here` holds (one per node: local rank 0), then every rank waits for them and
    raises the first failing rank's exception, so that none is left waiting in a collective."""
    error = None
    if here:
        try:
            produce()
        except Exception as exc:  # re-raised on every rank below
            error = exc
    if device.world_size > 1:
        import torch.distributed as dist

        errors = [None] * device.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def gather_files(device: Device, paths: list[Path]) -> dict[str, bytes]:
    """On rank 0, every rank's files of these paths (small ones: RNG states) by name; {} on the others. Nodes
    write a checkpoint to their own disks, and rank 0 uploads it."""
    if device.world_size == 1:
        return {}
    import torch.distributed as dist

    every = [None] * device.world_size
    dist.all_gather_object(every, {path.name: path.read_bytes() for path in paths})
    return {name: content for files in every for name, content in files.items()} if device.rank_zero else {}


def most(device: Device, value: int) -> int:
    """The largest of every rank's value: ranks must stop at the same step, or DDP hangs."""
    return _reduce(device, value, "MAX")


def least(device: Device, value: int) -> int:
    """The smallest of every rank's value: ranks must train with one plan, or DDP hangs."""
    return _reduce(device, value, "MIN")


def _reduce(device: Device, value: int, op: str) -> int:
    if device.world_size == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=f"cuda:{device.local_rank}" if device.cuda else "cpu")
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return int(tensor.item())


def barrier(device: Device) -> None:
    if device.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def teardown(device: Device) -> None:
    """Every rank leaves the process group at the same point (a barrier first)."""
    if device.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
