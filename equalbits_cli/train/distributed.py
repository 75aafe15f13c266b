"""Devices and processes: which device each rank uses, and the few collective calls training needs.

Under ``torchrun`` every process reads ``LOCAL_RANK`` and takes the GPU of that index, as timm's
``init_distributed_device`` does; without it every rank would land on ``cuda:0``.
"""

from __future__ import annotations

import os

import torch

from ..errors import SettingError

__all__ = ["device_for_rank", "resolve_device", "dist_setup", "all_equal", "barrier"]


def device_for_rank(name: str, local_rank: int, cuda_available: bool, cuda_count: int) -> torch.device:
    """The device a process should use, as a pure function of its settings (testable without a GPU).

    ``auto`` is CUDA when available, else CPU. A bare ``cuda`` becomes ``cuda:LOCAL_RANK`` so that the
    processes of one machine share its GPUs out one each; an explicit ``cuda:N`` is kept.

    Raises:
        ValueError: CUDA asked for but absent, or fewer GPUs than local ranks.

    Example:
        >>> device_for_rank("auto", 1, True, 2), device_for_rank("auto", 1, False, 0)
        (device(type='cuda', index=1), device(type='cpu'))
    """
    if name == "auto":
        name = "cuda" if cuda_available else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise SettingError(f"`device` must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not cuda_available:
        raise SettingError("`device` cuda asked for, but no CUDA device is available; use `device` cpu")
    if name == "cuda":
        if local_rank >= cuda_count:
            raise ValueError(
                f"local rank {local_rank} has no GPU of its own ({cuda_count} visible); "
                f"start at most {cuda_count} processes per node"
            )
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_device(name: str) -> torch.device:
    """This process's device (see :func:`device_for_rank`); also makes it the current CUDA device."""
    cuda = torch.cuda.is_available()
    device = device_for_rank(
        name, int(os.environ.get("LOCAL_RANK", "0")), cuda, torch.cuda.device_count() if cuda else 0
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def dist_setup(device: torch.device) -> tuple[int, int]:
    """``(rank, world size)``; starts the process group under torchrun (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart in ("", "0"):
            dist.init_process_group(backend)
        else:
            # After `torchrun --max-restarts` restarts the workers, the agent's store still holds the keys
            # of the attempt before (each rank's address): a new rank could read a dead peer's address and
            # fail to connect. A prefix per attempt keeps every attempt's keys apart.
            store, rank, world = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"equalbits/attempt{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size()


def all_equal(value: int, world: int, device: torch.device) -> bool:
    """Whether every rank holds the same integer (True on a single process)."""
    if world <= 1:
        return True
    import torch.distributed as dist

    dev = device if device.type == "cuda" else torch.device("cpu")
    sums = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(sums, torch.tensor([value], dtype=torch.int64, device=dev))
    return len({int(s) for s in sums}) == 1


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
