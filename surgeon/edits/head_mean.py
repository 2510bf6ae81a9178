"""The ``head_mean`` edit kind (:class:`HeadMean`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.errors import PlanError
from ...core.kinds import Items, Number
from ...core.settings import setting
from ...core.shape import ModelShape
from .base import FIRST_EDITABLE_LAYER, Edit, EditCall, register_edit


@register_edit
@dataclass(frozen=True)
class HeadMean(Edit):
    """Mean ablation: replace each chosen head's output with its dataset mean ``means
    [len(heads)][head_dim]`` (see :func:`headlab.surgeon.head_output_means`)."""

    kind: ClassVar[str] = "head_mean"
    stage: ClassVar[str] = "output"
    on_bridge: ClassVar[bool] = True

    means: tuple[tuple[float, ...], ...] = setting((), "each head's mean output", kind=Items(Items(Number(), unique=False,
                                                                                                   min_items=1),
                                                                                             unique=False, min_items=0))

    @classmethod
    def example(cls, shape: ModelShape) -> "HeadMean":
        """Every head of the first editable layer replaced by a zero mean output."""
        heads = tuple(range(shape.n_heads))
        return cls(layer=min(FIRST_EDITABLE_LAYER, shape.n_layers - 1), heads=heads,
                   means=((0.0,) * shape.head_dim,) * len(heads))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if len(self.means) != len(self.heads) or any(len(row) != shape.head_dim for row in self.means):
            raise PlanError(
                f"head_mean edit on layer {self.layer}: means must be {len(self.heads)} rows of "
                f"head_dim={shape.head_dim} values"
            )

    def apply(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        out = out.clone()
        out[:, :, list(self.heads)] = torch.tensor(self.means, dtype=out.dtype, device=out.device)
        return out

    def affine(self, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = list(self.heads)
        scale, shift = scale.clone(), shift.clone()
        scale[heads] = 0.0
        shift[heads] = torch.tensor(self.means, dtype=shift.dtype)
        return scale, shift


__all__ = ["HeadMean"]
