"""What every Triton launcher shares: whether the kernels run in Triton's interpreter (on the CPU, where
tiles are upcast to fp32 before every dot), and output buffers that, there, show any element a kernel
did not write (pre-filled with NaN, or :data:`UNWRITTEN_INDEX` for integers). Launchers call
``_launch.output`` through this module, so the GPU compile check can swap it in one place."""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
UNWRITTEN_INDEX = torch.iinfo(torch.int64).min


def output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer of ``shape``; under the interpreter pre-filled so that an unwritten element shows."""
    if not INTERPRET:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else UNWRITTEN_INDEX
    return torch.full(shape, fill, dtype=dtype, device=device)


__all__ = ["INTERPRET", "UNWRITTEN_INDEX", "output"]
