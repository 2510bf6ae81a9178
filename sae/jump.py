"""JumpReLU's autograd functions: the Heaviside step and the jump, with straight-through gradients
for the thresholds through a rectangle kernel of width :data:`JUMP_BANDWIDTH`."""

from __future__ import annotations

import torch

JUMP_BANDWIDTH = 0.001  # ε of the rectangle kernel of JumpReLU's straight-through gradient


class JumpStep(torch.autograd.Function):
    """Heaviside ``1[pre > θ]`` with a straight-through gradient for θ: ``−(1/ε)·K((pre−θ)/ε)``,
    ``K`` the rectangle on [−½, ½] (no gradient to ``pre``)."""

    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < JUMP_BANDWIDTH / 2).to(pre.dtype)
        return None, -(grad * window / JUMP_BANDWIDTH).sum(0)


class JumpReLUFunction(torch.autograd.Function):
    """``pre · 1[pre > θ]``: gradient to ``pre`` where active, straight-through to θ:
    ``−(θ/ε)·K((pre−θ)/ε)``."""

    @staticmethod
    def forward(ctx, pre, threshold):
        ctx.save_for_backward(pre, threshold)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < JUMP_BANDWIDTH / 2).to(pre.dtype)
        return grad * (pre > threshold), -(grad * window * threshold / JUMP_BANDWIDTH).sum(0)


__all__ = ["JUMP_BANDWIDTH", "JumpReLUFunction", "JumpStep"]
