"""The ``redistribute`` edit kind (:class:`Redistribute`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.errors import PlanError
from ...core.kinds import Integer, Items, Number
from ...core.settings import setting
from ...core.shape import ModelShape
from . import formulas
from .base import FIRST_EDITABLE_LAYER, Edit, EditCall, register_edit


@register_edit
@dataclass(frozen=True)
class Redistribute(Edit):
    """VAR: on rows whose mass on the request's span is at least ``span_mass_min`` and whose
    sink share of it is at most ``sink_share_max``, keep ``keep_fraction`` of every sink weight
    and move the rest to the span's non-sink keys in proportion. Sink tokens: ``φ > sink_threshold``
    on the residual stream entering the layer, over ``sink_dims`` (see
    :func:`headlab.surgeon.detect_sink_dimensions`), found at prefill and frozen."""

    kind: ClassVar[str] = "redistribute"
    stage: ClassVar[str] = "reweight"
    needs_prompt: ClassVar[bool] = True
    needs_residual: ClassVar[bool] = True

    sink_dims: tuple[int, ...] = setting((), "residual-stream dimensions that mark sink tokens",
                                         kind=Items(Integer(0), min_items=0))
    keep_fraction: float = setting(0.6, "fraction of each sink weight kept", kind=Number(0.0, 1.0))
    span_mass_min: float = setting(0.2, "rows with at least this mass on the span are edited", kind=Number(0.0, 1.0))
    sink_share_max: float = setting(0.5, "... and at most this share of it on sinks", kind=Number(0.0, 1.0))
    sink_threshold: float = setting(20.0, "a token is a sink when max |x_d| / RMS(x) exceeds this", kind=Number(0.0))

    @classmethod
    def example(cls, shape: ModelShape) -> "Redistribute":
        """VAR on every head of the first editable layer, with the residual stream's dimension 0 as the sink
        dimension (a model's own come from :func:`headlab.surgeon.detect_sink_dimensions`)."""
        return cls(layer=FIRST_EDITABLE_LAYER, heads=tuple(range(shape.n_heads)), sink_dims=(0,))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if not FIRST_EDITABLE_LAYER <= self.layer <= shape.n_layers - 2:
            raise PlanError(
                f"redistribute edit on layer {self.layer}: VAR edits layers {FIRST_EDITABLE_LAYER}.."
                f"{shape.n_layers - 2} (never 0-1 or the last layer)"
            )
        if not self.sink_dims:
            raise PlanError("redistribute edit needs sink_dims (detect them with detect_sink_dimensions)")

    def validate_residual(self, hidden_size: int) -> None:
        beyond = [dim for dim in self.sink_dims if dim >= hidden_size]
        if beyond:
            raise PlanError(f"redistribute edit on layer {self.layer}: sink_dims {beyond} lie beyond the residual "
                            f"stream's {hidden_size} dimensions (0..{hidden_size - 1})")

    def apply(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        """Sink tokens from the prefill's residual stream (frozen), then move sink mass to the span on
        the rows after it."""
        state = at.state
        if state.span is None:
            raise PlanError(f"redistribute edit on layer {self.layer} needs Request(span=...)")
        sinks = at.keys(state.frozen_for(self, lambda: self._sink_tokens(probs, at)))[:, None, :]
        span = at.keys(state.span)
        span_end = torch.where(state.span, torch.arange(state.span.shape[-1]), -1).amax(-1).to(probs.device)  # [B]
        editable = at.rows[None, :].to(probs.device) > span_end[:, None]  # after the span (and every decode row)
        return formulas.var_redistribute(probs, sinks, span[:, None, :], editable, self.keep_fraction,
                                      self.span_mass_min, self.sink_share_max)

    def _sink_tokens(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        hidden = at.state.residual.get(self.layer)
        if hidden is None or probs.shape[-2] != probs.shape[-1] or at.call.key_start:
            raise PlanError("VAR needs the prefill of the request (the residual stream entering the layer)")
        ratio = formulas.sink_ratio(hidden[:, :at.state.n_prompt], list(self.sink_dims))
        return (ratio > self.sink_threshold) & at.state.prompt_keys


__all__ = ["Redistribute"]
