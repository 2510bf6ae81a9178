"""Per-request inputs of the edits (spans, reference outputs) and the state frozen at prefill.

A request starts with a prefill call (as many queries as keys); decode calls add rows at the
end of the cache. State found at prefill (the prompt length, and under each edit's own key what
it fixed: ACT sink sets, VAR sink tokens, VHR head choices) is kept for the decode rows, so cached decoding matches a full recompute
with the same state (:meth:`RequestState.pin`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..core.errors import PlanError
from ..core.kinds import Integer

Span = tuple[int, int] | torch.Tensor


@dataclass
class Request:
    """What the edits need to know about the input.

    ``span``: the target span of VAR and VHR (an image or a document): ``(start, stop)`` key
    positions for every batch row, or a bool tensor ``[B, N]``. ``emphasis``: PASTA's emphasised
    span, same forms, or a list of them (several sections). ``reference``: VHR's per-layer head
    outputs of the input without its span, ``{layer: [B, H, D]}`` at the last position (:func:`headlab.surgeon.reference_outputs`).
    """

    span: Span | None = None
    emphasis: Span | list[Span] | None = None
    reference: dict[int, torch.Tensor] | None = None


def section_masks(sections, batch: int, n_key: int, name: str) -> torch.Tensor | None:
    """``[B, S, n_key]`` bool of one span or a list of ``S`` spans (each as :func:`span_mask` takes)."""
    if sections is None:
        return None
    if isinstance(sections, list):
        if not sections:
            raise PlanError(f"{name} is an empty list of sections")
        return torch.stack([span_mask(section, batch, n_key, f"{name} section {i}")
                            for i, section in enumerate(sections)], dim=1)
    return span_mask(sections, batch, n_key, name)[:, None, :]


def span_mask(span: Span | None, batch: int, n_key: int, name: str) -> torch.Tensor | None:
    """``[B, n_key]`` bool of a span given as ``(start, stop)`` or as a bool tensor; clear errors
    for empty spans and spans outside the input."""
    if span is None:
        return None
    if isinstance(span, torch.Tensor):
        if span.dtype != torch.bool or span.dim() != 2 or span.shape[0] != batch or span.shape[1] > n_key:
            raise PlanError(f"{name} mask must be bool [batch={batch}, ≤{n_key}], got {span.dtype} {tuple(span.shape)}")
        mask = torch.nn.functional.pad(span, (0, n_key - span.shape[1]), value=False)
    else:
        if isinstance(span, (str, bytes)) or len(span) != 2:
            raise PlanError(f"{name} must be (start, stop) or a bool tensor [batch, keys], got {span!r}")
        try:
            start, stop = (Integer().check(x) for x in span)
        except ValueError as err:
            raise PlanError(f"{name}: {err}") from None
        if not 0 <= start < stop <= n_key:
            raise PlanError(f"{name} ({start}, {stop}) is empty or outside the input of {n_key} tokens")
        mask = torch.zeros(batch, n_key, dtype=torch.bool)
        mask[:, start:stop] = True
    if not mask.any(-1).all():
        raise PlanError(f"{name} is empty for some batch row")
    return mask


@dataclass
class RequestState:
    """What the prefill of the current request fixed; reset by the next prefill unless pinned.

    Key sets are indexed by sequence position ``[B, N0]`` over the prompt; a call whose keys
    start later (sliding-window caches) or run past the prompt (decoding) reads them through
    :meth:`in_call`."""

    n_prompt: int | None = None  # prompt length: positions before it are prompt, later ones generated
    prompt_keys: torch.Tensor | None = None  # [B, N0] bool: valid prompt tokens
    span: torch.Tensor | None = None  # [B, N0] bool
    emphasis: torch.Tensor | None = None  # [B, S, N0] bool: one mask per emphasised section
    frozen: dict[tuple, Any] = field(default_factory=dict)  # an edit's state_key() -> what its prefill fixed
    residual: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> residual stream [B, N, d]
    pinned: bool = False

    def frozen_for(self, edit, make: Callable[[], Any] | None = None) -> Any:
        """What ``edit`` fixed at this request's prefill (ACT's sink sets, VAR's sink tokens, VHR's
        heads), made by ``make`` the first time it is asked for."""
        key = edit.state_key()
        if key not in self.frozen:
            if make is None:
                raise KeyError(f"{edit.kind} edit on layer {edit.layer} has fixed nothing yet (no prefill)")
            self.frozen[key] = make()
        return self.frozen[key]

    def pin(self) -> None:
        """Keep this state for later calls: a prefill over the prompt plus generated tokens then
        treats the extra rows like decode rows (the exact recompute of a cached generation)."""
        self.pinned = True

    @staticmethod
    def in_call(keys: torch.Tensor, key_start: int, n_key: int) -> torch.Tensor:
        """The entries of a ``[..., N0]`` key mask for a call's keys, positions
        ``key_start .. key_start + n_key - 1``; positions past the prompt (generated tokens) are False."""
        stop = key_start + n_key
        padded = torch.nn.functional.pad(keys, (0, max(0, stop - keys.shape[-1])), value=False)
        return padded[..., key_start:stop]
