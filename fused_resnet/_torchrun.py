"""What ``train`` needs to run under ``torchrun``: the process's place in the job, read from the
environment that ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), and the few
collectives the loop uses. With no such environment it is one process and every helper is a no-op,
so the same code runs unchanged with and without ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Place:
    """This process's rank among ``world_size`` processes and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process prints, shows progress bars and writes files."""
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; anything else as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    return device


def setup(device_name: str = "auto") -> Place:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on CUDA; each process
    takes GPU ``LOCAL_RANK``), else describe the single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_name)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Place(rank, world_size, local_rank, device)


def teardown(place: Place) -> None:
    if place.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(place: Place, *values: float) -> list[float]:
    """Each value summed over all processes (fp64, on the collective's device)."""
    if not place.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=place.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(place: Place) -> None:
    if place.distributed:
        dist.barrier()
