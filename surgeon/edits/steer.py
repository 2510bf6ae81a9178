"""The ``steer`` edit kind (:class:`Steer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.errors import PlanError
from ...core.kinds import Choice, Number, Switch
from ...core.settings import setting
from . import formulas
from .base import Edit, EditCall, register_edit
from .formulas import PASTA_POSITIONS


@register_edit
@dataclass(frozen=True)
class Steer(Edit):
    """PASTA: add ``log alpha`` to the logits of every prompt key outside the request's emphasised
    sections (generated keys untouched), on all rows of the chosen heads (:func:`.formulas.pasta_bias`:
    ``position`` and ``per_section`` give the released code's other modes; the default biases the
    union of the sections once)."""

    kind: ClassVar[str] = "steer"
    stage: ClassVar[str] = "bias"
    needs_prompt: ClassVar[bool] = True

    alpha: float = setting(0.01, "factor on the attention of the keys the bias applies to",
                           kind=Number(0.0, 1e6, low_open=True))
    position: str = setting("exclude", "the release's scale_position", kind=Choice(*PASTA_POSITIONS))
    per_section: bool = setting(False, "bias once per emphasised section, as the release does", kind=Switch())

    def apply(self, logits: torch.Tensor, at: EditCall) -> torch.Tensor:
        if at.state.emphasis is None:
            raise PlanError(f"steer edit on layer {self.layer} needs Request(emphasis=...)")
        return formulas.pasta_bias(logits, at.keys(at.state.emphasis), at.keys(at.state.prompt_keys), self.alpha,
                                self.position, self.per_section)


__all__ = ["Steer"]
