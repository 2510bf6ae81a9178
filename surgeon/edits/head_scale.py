"""The ``head_scale`` edit kind (:class:`HeadScale`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.kinds import Number
from ...core.settings import setting
from .base import Edit, EditCall, register_edit


@register_edit
@dataclass(frozen=True)
class HeadScale(Edit):
    """Multiply the chosen heads' outputs by ``scale`` before ``o_proj`` (0 ablates them)."""

    kind: ClassVar[str] = "head_scale"
    stage: ClassVar[str] = "output"
    on_bridge: ClassVar[bool] = True

    scale: float = setting(1.0, "factor on the heads' outputs (0 ablates; at most 1000 in size)",
                           kind=Number(-1000.0, 1000.0))

    def apply(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        scales = torch.ones(out.shape[2], dtype=out.dtype, device=out.device)
        scales[list(self.heads)] = self.scale
        return out * scales[None, None, :, None]

    def affine(self, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = list(self.heads)
        scale, shift = scale.clone(), shift.clone()
        scale[heads] *= self.scale
        shift[heads] *= self.scale
        return scale, shift


__all__ = ["HeadScale"]
