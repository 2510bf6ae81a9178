"""Settings of a linear-attention conversion and the trainable Hedgehog feature maps (SPEC §3.1).

A feature map belongs to one layer and one side (queries or keys) and holds one projection per
query head. ``lolcats`` (default): ``φ(x) = clamp_{≥1e-12}(softmax(xW + b) ⊕ softmax(−(xW + b)))``
with ``W [D, F]`` initialised to the truncated identity, giving ``2F`` features. ``fla``: one
softmax over ``[2xW, −2xW]`` with ``W [D, D]`` initialised to the identity, giving ``2D`` features.
The two are not interchangeable; a checkpoint records which one it was trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

FORMS = ("hybrid", "linear")
FEATURE_MAPS = ("lolcats", "fla")


@dataclass(frozen=True)
class LinearSettings:
    """How attention layers are converted (saved beside the weights as ``headlab_conversion.json``).

    ``layers`` lists the converted layer indices (``None``: all); the others stay softmax.
    ``feature_dim`` is ``F`` (64 by default whatever the head size, as LoLCATs does; the features
    number ``2F``). ``gamma_init`` is the initial softmax-window weight ``γ = sigmoid(θ)``.
    """

    form: str = "hybrid"
    window: int = 64
    terrace: bool = True
    feature_dim: int = 64
    feature_map: str = "lolcats"
    feature_bias: bool = False
    gamma_init: float = 0.1
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.window < 1 or self.feature_dim < 1:
            raise ValueError("window and feature_dim must be positive")
        if not 0.0 < self.gamma_init < 1.0:
            raise ValueError(f"gamma_init must lie in (0, 1), got {self.gamma_init}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))

    @property
    def is_hybrid(self) -> bool:
        return self.form == "hybrid"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LinearSettings":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("layers") is not None:
            known["layers"] = tuple(known["layers"])
        return cls(**known)


class FeatureMap(nn.Module):
    """Hedgehog feature map of one layer and side: ``[B, H, T, D]`` → ``[B, H, T, 2F]`` (fp32)."""

    def __init__(self, n_heads: int, head_dim: int, settings: LinearSettings):
        super().__init__()
        self.kind = settings.feature_map
        width = settings.feature_dim if self.kind == "lolcats" else head_dim
        eye = torch.eye(head_dim, width)  # truncated identity I_{D×F}
        self.weight = nn.Parameter(eye.repeat(n_heads, 1, 1))  # [H, D, F]
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, width)) if settings.feature_bias else None

    @property
    def n_features(self) -> int:
        return 2 * self.weight.shape[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.einsum("bhtd,hdf->bhtf", x.float(), self.weight.float())
        if self.bias is not None:
            u = u + self.bias.float()
        if self.kind == "fla":
            return torch.softmax(torch.cat([2 * u, -2 * u], -1), -1)
        return torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1).clamp(min=1e-12)


def logit(p: float) -> float:
    """``θ`` with ``sigmoid(θ) = p``."""
    return math.log(p / (1.0 - p))
