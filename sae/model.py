"""The sparse autoencoder (SPEC §6.2–6.4): ReLU + L1, TopK, BatchTopK and JumpReLU on one module.

Shapes: ``x [B, d_in]`` (per-head outputs flattened head-major, ``d_in = n_heads · d_head``),
codes ``[B, d_sae]``. ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]`` (unit-norm rows),
``b_enc [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]``. The model works on normalised
inputs ``c · x``; ``scale = c`` is kept as a buffer and folded in when saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dense_codes, sparse_decode, topk_encode
from .settings import ARCHITECTURES

JUMP_BANDWIDTH = 0.001  # ε of the rectangle kernel of JumpReLU's straight-through gradient


@dataclass
class Encoded:
    """One forward: ``x_hat [B, d_in]``, dense ``codes [B, d_sae]``, ``pre`` the pre-activations
    ``[B, d_sae]`` (for AuxK and JumpReLU's sparsity loss)."""

    x_hat: torch.Tensor
    codes: torch.Tensor
    pre: torch.Tensor


class _JumpStep(torch.autograd.Function):
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


class _JumpReLU(torch.autograd.Function):
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


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder of ``arch`` (:data:`ARCHITECTURES`) with ``k`` active latents
    (TopK/BatchTopK). ``n_heads``/``d_head`` describe the input layout (``d_in`` = their
    product) for head attribution."""

    def __init__(self, d_in: int, d_sae: int, arch: str = "topk", k: int = 32, n_heads: int = 1,
                 d_head: int | None = None, seed: int = 0):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
        d_head = d_head or d_in // n_heads
        if n_heads * d_head != d_in:
            raise ValueError(f"d_in {d_in} is not n_heads {n_heads} x d_head {d_head}")
        if arch in ("topk", "batchtopk") and not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..{d_sae}, got {k}")
        self.arch, self.k, self.n_heads, self.d_head = arch, k, n_heads, d_head
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        threshold = torch.zeros(d_sae)
        if arch == "jumprelu":
            self.threshold = nn.Parameter(threshold)
        else:
            self.register_buffer("threshold", threshold)
        self.register_buffer("scale", torch.ones(()))

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x − b_dec) W_enc + b_enc``, ``[B, d_sae]``, on normalised inputs."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def forward(self, x: torch.Tensor) -> Encoded:
        """Encode and decode normalised inputs ``x [B, d_in]``. TopK goes through the sparse
        ops (no dense code in its backward); BatchTopK keeps the ``B·k`` largest activations
        of the batch in training and uses its threshold at inference."""
        if self.arch == "topk":
            values, indices = topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.k)
            x_hat = sparse_decode(values, indices, self.W_dec, self.b_dec)
            return Encoded(x_hat, dense_codes(values.detach(), indices, self.d_sae), None)
        pre = self.pre_activations(x)
        codes = self.activation(pre)
        return Encoded(codes @ self.W_dec + self.b_dec, codes, pre)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The code of pre-activations ``pre [B, d_sae]`` for the architectures other than TopK."""
        if self.arch == "relu":
            return F.relu(pre)
        if self.arch == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold)
        if self.training:  # batchtopk
            flat = F.relu(pre).flatten()
            values, indices = flat.topk(min(self.k * pre.shape[0], flat.numel()))
            return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)
        return pre * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``[B, d_sae]`` of raw (unnormalised) activations."""
        return self(x * self.scale).codes

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw activations ``x [B, d_in]`` in raw units."""
        return self(x * self.scale).x_hat / self.scale

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw-unit reconstruction ``[B, d_in]`` from dense codes."""
        return (codes @ self.W_dec + self.b_dec) / self.scale

    def sparsity_step(self, pre: torch.Tensor) -> torch.Tensor:
        """JumpReLU's L0 with a straight-through gradient for the thresholds, ``[B, d_sae]``."""
        return _JumpStep.apply(pre, self.threshold)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale each decoder row to unit norm (after an optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """``g_i ← g_i − (g_i·w_i) w_i`` on each decoder row (before an optimiser step)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    def config(self) -> dict:
        """What rebuilds this module: ``SparseAutoencoder(**config)``."""
        return {"d_in": self.d_in, "d_sae": self.d_sae, "arch": self.arch, "k": self.k,
                "n_heads": self.n_heads, "d_head": self.d_head}
