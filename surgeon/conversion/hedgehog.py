"""The trainable Hedgehog feature maps (docs/methods/conversion.md); their settings are :class:`LinearSettings`.

A feature map belongs to one layer and one side (queries or keys) and holds one projection per
query head. ``lolcats`` (default): ``φ(x) = clamp_{≥1e-12}(softmax(xW + b) ⊕ softmax(−(xW + b)))``
with ``W [D, F]`` initialised to the truncated identity, giving ``2F`` features. ``fla``: one
softmax over ``[2xW, −2xW]`` with ``W [D, D]`` initialised to the identity, giving ``2D`` features.
``feature_init="kaiming"`` starts ``W`` kaiming-uniform instead, as the released LoLCATs configs
do (fan-in ``D·F`` of the ``[H, D, F]`` tensor, drawn from torch's global generator).
The two are not interchangeable; a checkpoint records which one it was trained with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .settings import LinearSettings


class FeatureMap(nn.Module):
    """Hedgehog feature map of one layer and side: ``[B, H, T, D]`` → ``[B, H, T, 2F]`` (fp32)."""

    def __init__(self, n_heads: int, head_dim: int, settings: LinearSettings):
        super().__init__()
        self.kind = settings.feature_map
        width = settings.feature_dim if self.kind == "lolcats" else head_dim
        self.weight = nn.Parameter(torch.eye(head_dim, width).repeat(n_heads, 1, 1))  # [H, D, F]: truncated identity
        if settings.feature_init == "kaiming":
            nn.init.kaiming_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, width)) if settings.feature_bias else None

    @property
    def n_features(self) -> int:
        return 2 * self.weight.shape[-1]

    def forward(self, x: torch.Tensor, heads: list[int] | None = None) -> torch.Tensor:
        """Features of ``x [B, H', T, D]``, whose heads are ``heads`` of this map (None: all ``H``)."""
        weight = self.weight if heads is None else self.weight[heads]
        u = torch.einsum("bhtd,hdf->bhtf", x.float(), weight.float())
        if self.bias is not None:
            u = u + (self.bias if heads is None else self.bias[heads]).float()
        if self.kind == "fla":
            return torch.softmax(torch.cat([2 * u, -2 * u], -1), -1)
        return torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1).clamp(min=1e-12)


def logit(p: float) -> float:
    """``θ`` with ``sigmoid(θ) = p``."""
    return math.log(p / (1.0 - p))
