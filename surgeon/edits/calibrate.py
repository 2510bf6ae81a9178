"""The ``calibrate`` edit kind (:class:`Calibrate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.errors import PlanError
from ...core.kinds import Choice, Maybe, Number
from ...core.settings import setting
from ...core.shape import ModelShape
from ..search.settings import ACT_BETA, ACT_THRESHOLD
from . import formulas
from .base import FIRST_EDITABLE_LAYER, Edit, EditCall, register_edit
from .formulas import DROP_FIRST


@register_edit
@dataclass(frozen=True)
class Calibrate(Edit):
    """ACT: scale the weights of each head's attention sinks by ``beta`` and give the freed mass
    to the other visible keys in proportion. Sinks: keys whose mean received attention at
    prefill exceeds ``threshold`` (or ``relative_c / N`` when set), minus the first one as
    ``drop_first`` says; frozen for decode rows."""

    kind: ClassVar[str] = "calibrate"
    stage: ClassVar[str] = "reweight"
    needs_prompt: ClassVar[bool] = True

    beta: float = setting(ACT_BETA, "factor on the sink weights", kind=Number(0.0, 1.0))
    threshold: float = setting(ACT_THRESHOLD, "mean received attention above which a key is a sink",
                               kind=Number(0.0, 1.0))
    relative_c: float | None = setting(None, "sinks exceed relative_c / N instead", kind=Maybe(Number(0.0, low_open=True)))
    drop_first: str = setting("lowest", "which first sink is spared", kind=Choice(*DROP_FIRST))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if self.layer < FIRST_EDITABLE_LAYER:
            raise PlanError(f"calibrate edit on layer {self.layer}: layers 0-1 are never calibrated")

    def apply(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        """Find the sinks from the prefill's rows (frozen for later calls), then reweight."""
        state = at.state
        sinks = state.frozen_for(self, lambda: self._sinks(probs, at))
        first_valid = state.prompt_keys.float().argmax(-1)  # [B]: position of the first real token
        protected = at.rows[None, :].to(probs.device) == first_valid[:, None]  # the first token's own row
        return formulas.act_reweight(probs, at.keys(sinks), at.visible, self.beta, protected)

    def _sinks(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        if probs.shape[-2] != probs.shape[-1] or at.call.key_start:
            raise PlanError("ACT needs the prefill of the request before its decode rows")
        prompt = at.state.prompt_keys.to(probs.device)
        scores = formulas.mean_received(probs, at.visible, prompt)
        return formulas.act_sink_set(scores, prompt, self.threshold, self.relative_c,
                                  self.drop_first)[..., :at.state.n_prompt]


__all__ = ["Calibrate"]
