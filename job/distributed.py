"""torchrun support: every rank trains; rank 0 alone reads the dataset and writes the outputs, and
shares what it read (or the error it met) with the other ranks, so that they all exit alike."""

import logging

log = logging.getLogger(__name__)


def setup(settings) -> None:
    """Joins the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR); one GPU per rank."""
    if settings.WORLD_SIZE == 1:
        return
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not settings.DRY_RUN
    if cuda:
        torch.cuda.set_device(settings.LOCAL_RANK)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    log.info("rank %d of %d (local rank %d)", settings.RANK, settings.WORLD_SIZE, settings.LOCAL_RANK)


def share(settings, produce):
    """produce() run on rank 0, its result (or the exception it raised) handed to every rank."""
    if settings.WORLD_SIZE == 1:
        return produce()
    import torch.distributed as dist

    box = [None]
    if settings.RANK == 0:
        try:
            box[0] = (produce(), None)
        except Exception as exc:  # re-raised on every rank below
            box[0] = (None, exc)
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def barrier(settings) -> None:
    if settings.WORLD_SIZE > 1:
        import torch.distributed as dist

        dist.barrier()


def teardown(settings) -> None:
    """Every rank leaves the process group at the same point (a barrier first)."""
    if settings.WORLD_SIZE > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
