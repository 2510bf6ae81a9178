"""The sparse autoencoder module; what differs between architectures (ReLU + L1, TopK, BatchTopK,
JumpReLU, or one registered later) is its :class:`~.architectures.Architecture`.

Shapes: ``x [B, d_in]`` (per-head outputs flattened head-major, ``d_in = n_heads · d_head``),
codes ``[B, d_sae]``. ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]`` (unit-norm rows),
``b_enc [d_sae]``, ``b_dec [d_in]``, ``threshold [d_sae]``. The model works on normalised
inputs ``c · x``; ``scale = c`` is kept as a buffer and folded in when saving.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import Encoded, architecture


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder of the architecture named ``arch`` (:data:`~.architectures.ARCHITECTURES`)
    with ``k`` active latents where the architecture uses ``k``. ``n_heads``/``d_head`` describe
    the input layout (``d_in`` = their product) for head attribution."""

    def __init__(self, d_in: int, d_sae: int, arch: str = "topk", k: int = 32, n_heads: int = 1,
                 d_head: int | None = None, seed: int = 0):
        super().__init__()
        self.architecture = architecture(arch)
        d_head = d_head or d_in // n_heads
        if n_heads * d_head != d_in:
            raise ValueError(f"d_in {d_in} is not n_heads {n_heads} x d_head {d_head}")
        if self.architecture.uses_k and not 0 < k <= d_sae:
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
        if self.architecture.threshold == "learned":
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
        """Encode and decode normalised inputs ``x [B, d_in]`` as the architecture does."""
        return self.architecture.encode(self, x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes ``[B, d_sae]`` of raw (unnormalised) activations."""
        return self(x * self.scale).codes

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw activations ``x [B, d_in]`` in raw units."""
        return self(x * self.scale).x_hat / self.scale

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw-unit reconstruction ``[B, d_in]`` from dense codes."""
        return (codes @ self.W_dec + self.b_dec) / self.scale

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
