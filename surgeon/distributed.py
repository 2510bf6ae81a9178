"""The process group a command runs in, for the probes and autoencoders that shard work."""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """``tensor`` reduced in place over the process group (sum by default; a no-op alone)."""
    if rank_and_world()[1] > 1:
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows [n, ...]`` stacked in rank order (the rows themselves alone)."""
    world = rank_and_world()[1]
    if world == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(world)]
    torch.distributed.all_gather(parts, rows.contiguous())
    return torch.cat(parts)
