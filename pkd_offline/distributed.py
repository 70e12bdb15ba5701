"""Process groups under ``torchrun``: one process per GPU (or per CPU worker with gloo)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pkd_offline.errors import PkdError


def half_the_cpus(most: int = 8) -> int:
    """Half this machine's CPUs, 1 to ``most``: threads or workers that leave the other half to the process
    launching the device's work."""
    return max(1, min(most, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group exists, even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched


def init_ranks(device: torch.device) -> Ranks:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    Under torchrun the group is joined even by a single process (as torchvision's references do), so
    ``torchrun --nproc_per_node 1`` runs the same DDP, barrier and nccl path as many GPUs.
    """
    if "RANK" not in os.environ:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1")),
                  int(os.environ.get("LOCAL_RANK", "0")), launched=True)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)  # nccl and barriers use this process's GPU, not GPU 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks


def resolve_device(name: str, ranks: Ranks = Ranks()) -> torch.device:
    """The torch device for ``--device``; under torchrun ``cuda`` is this process's GPU (``cuda:LOCAL_RANK``)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PkdError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PkdError(f"unknown --device {name!r}: use cpu or cuda") from None
    if device.type == "cuda" and device.index is None and ranks.distributed:
        return torch.device("cuda", ranks.local_rank)
    return device


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def gather_lists(values: list, ranks: Ranks) -> list:
    """Concatenate every rank's list (on every rank)."""
    if not ranks.distributed:
        return values
    gathered: list = [None] * ranks.world_size
    dist.all_gather_object(gathered, values)
    return [value for part in gathered for value in part]


def finish(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
