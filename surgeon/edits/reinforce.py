"""The ``reinforce`` edit kind (:class:`Reinforce`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.errors import PlanError
from ...core.kinds import Number
from ...core.settings import setting
from ...core.shape import ModelShape
from . import formulas
from .base import Edit, EditCall, register_edit


@register_edit
@dataclass(frozen=True)
class Reinforce(Edit):
    """VHR: among the candidate ``heads``, multiply by ``alpha`` the outputs of the heads whose
    divergence between the request with and without its span is above the layer median (after
    outlier removal), chosen at prefill per sample and frozen; prefill scales the last prompt
    row, decode every row. Needs the request's reference outputs
    (:func:`headlab.surgeon.reference_outputs`)."""

    kind: ClassVar[str] = "reinforce"
    stage: ClassVar[str] = "output"

    alpha: float = setting(2.0, "factor on the selected heads' outputs", kind=Number(0.0, 1000.0))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if len(self.heads) < 2:
            raise PlanError("reinforce edit needs at least two candidate heads (it keeps those above the median)")

    def apply(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        """Select at prefill (per sample, frozen), then scale the last prompt row and every later row."""
        n_prompt = at.state.n_prompt
        if n_prompt is None:
            raise PlanError(f"reinforce edit on layer {self.layer} needs the prefill of the request before its "
                            "decode steps")
        selected = at.state.frozen_for(self, lambda: self._select(out, at))  # [B, H]
        factor = torch.where(selected, self.alpha, 1.0).to(out.dtype)
        reinforced = (at.rows >= n_prompt - 1).to(out.device)  # [Nq]
        factors = torch.where(reinforced[None, :, None], factor[:, None, :], torch.ones_like(factor[:, None, :]))
        return out * factors[..., None]

    def _select(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        reference = (at.request.reference or {}).get(self.layer)
        if reference is None or at.rows[-1] != at.state.n_prompt - 1:
            raise PlanError(f"reinforce edit on layer {self.layer} needs Request(reference=reference_outputs(...)) "
                            "and the prefill of the request")
        candidates = list(self.heads)
        last = out[:, -1, candidates].float()  # [B, h, D]
        ref = reference[:, candidates].float().to(out.device)
        selected = torch.zeros(out.shape[0], out.shape[2], dtype=torch.bool, device=out.device)
        selected[:, candidates] = formulas.vhr_select((last - ref).norm(dim=-1), ref.pow(2).sum(-1))
        return selected


__all__ = ["Reinforce"]
