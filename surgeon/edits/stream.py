"""The ``stream`` edit kind (:class:`Stream`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.errors import PlanError
from ...core.kinds import Integer, Switch
from ...core.settings import setting
from ...core.shape import ModelShape
from ..request import RequestState
from ..streaming.settings import STREAM_SINKS, STREAM_WINDOW
from . import formulas
from .base import Edit, EditCall, register_edit


@register_edit
@dataclass(frozen=True)
class Stream(Edit):
    """A streaming head (RazorAttention, DuoAttention): every row sees only the sequence's first
    ``sinks`` valid tokens and the ``window`` latest positions up to itself, at prefill and in
    decoding; with ``compensate``, also RazorAttention's compensation token (the mean key and value
    of the keys it no longer sees, weighted by their count). The policy is per KV head: ``heads``
    must hold every query head of each KV head they touch, so that KV head's cache needs only those
    entries."""

    kind: ClassVar[str] = "stream"
    stage: ClassVar[str] = "bias"
    needs_prompt: ClassVar[bool] = True

    sinks: int = setting(STREAM_SINKS, "first valid tokens every row keeps (attention sinks)", kind=Integer(0))
    window: int = setting(STREAM_WINDOW, "latest positions every row keeps, itself included", kind=Integer(1))
    compensate: bool = setting(False, "the hidden keys come back as one compensation token (RazorAttention)",
                               kind=Switch())

    @property
    def compensates(self) -> bool:
        return self.compensate

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        group = shape.group_size
        partial = sorted({h // group for h in self.heads if any(g not in self.heads for g in
                                                                range(h // group * group, (h // group + 1) * group))})
        if partial:
            raise PlanError(f"stream edit on layer {self.layer}: KV head(s) {partial} stream only if all their query "
                            f"heads do (each KV head serves {group} query heads)")

    def apply(self, logits: torch.Tensor, at: EditCall) -> torch.Tensor:
        keep = self._keep(at, logits.shape[-1]).to(logits.device)
        return logits.masked_fill(~keep[:, None], torch.finfo(torch.float32).min)

    def kept_keys(self, at: EditCall, n_key: int) -> torch.Tensor | None:
        return None if self.compensate else self._keep(at, n_key)

    def _keep(self, at: EditCall, n_key: int) -> torch.Tensor:
        """``[B, Nq, Nk]``: the sinks (each row's first valid tokens) and the window."""
        valid = at.state.prompt_keys  # [B, N0]
        first = valid & (valid.cumsum(-1) <= self.sinks)
        key_positions = at.call.key_start + torch.arange(n_key)
        return formulas.streaming_keep(RequestState.in_call(first, at.call.key_start, n_key), key_positions, at.rows,
                                    self.window)


__all__ = ["Stream"]
