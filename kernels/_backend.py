"""The one backend choice every public op makes: ``backend="auto" | "triton" | "torch"``.

``"auto"`` runs an op's Triton path on CUDA tensors (where the op has one) and its torch path
elsewhere; ``"triton"`` forces the Triton path (on CPU tensors only under ``TRITON_INTERPRET=1``, set
before the first import); ``"torch"`` forces the torch path.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, device: torch.device, op: str = "this op", has_triton: bool = True) -> str:
    """The concrete backend (``"triton"`` or ``"torch"``) of ``op`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if backend == "triton":
        if not has_triton:
            raise ValueError(f"{op} has no Triton path; use backend='torch' (or 'auto')")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before import")
    return backend


__all__ = ["BACKENDS", "resolve_backend"]
