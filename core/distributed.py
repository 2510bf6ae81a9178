"""The process group a command runs in, for the probes and autoencoders that shard work (processes are
started by torchrun; headlab launches none itself)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def started_by_torchrun() -> tuple[int, int]:
    """``(rank, processes on this machine)`` from torchrun's environment (``RANK``,
    ``LOCAL_WORLD_SIZE``), ``(0, 1)`` outside torchrun or where they are not numbers. Costs no torch."""
    def number(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() else default

    if number("WORLD_SIZE", 1) <= 1:
        return 0, 1
    return number("RANK", 0), max(1, number("LOCAL_WORLD_SIZE", 1))


def first_process() -> bool:
    """Whether this is the first process of its torchrun group (or not under torchrun at all)."""
    return started_by_torchrun()[0] == 0


def init_distributed() -> None:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1): gloo on CPU, nccl on GPU."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """``tensor`` reduced in place over the process group (sum by default; a no-op alone)."""
    import torch

    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows [n, ...]`` stacked in rank order (the rows themselves alone)."""
    import torch

    world = rank_and_world()[1]
    if world == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(world)]
    torch.distributed.all_gather(parts, rows.contiguous())
    return torch.cat(parts)
