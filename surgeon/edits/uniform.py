"""The ``uniform`` edit kind (:class:`Uniform`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...core.kinds import Choice
from ...core.settings import setting
from . import formulas
from .base import Edit, EditCall, register_edit
from .formulas import UNIFORM_ROWS


@register_edit
@dataclass(frozen=True)
class Uniform(Edit):
    """Zero the chosen heads' logits on every key their rows see, as a zeroed query does: uniform
    attention over the visible keys (a learned sink keeps its own logit). ``rows="decode"`` edits
    only calls that extend a cached sequence, leaving the prefill untouched: the retrieval-head
    masking intervention (Wu et al.'s harness zeroes the query in decode steps only)."""

    kind: ClassVar[str] = "uniform"
    stage: ClassVar[str] = "bias"

    rows: str = setting("decode", "'decode': calls after the prefill only; 'all': every row", kind=Choice(*UNIFORM_ROWS))

    def edits_call(self, prefill: bool) -> bool:
        """Whether a call (the prefill of a sequence, or a later one) has rows this edit changes."""
        return self.rows == "all" or not prefill

    def apply(self, logits: torch.Tensor, at: EditCall) -> torch.Tensor:
        return formulas.uniform_logits(logits, at.visible)


__all__ = ["Uniform"]
