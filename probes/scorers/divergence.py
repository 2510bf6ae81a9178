"""Context-aware head divergence (VHD, docs/methods/vhr.md): how much a head's output at the
query position changes when a span (image tokens, a document) is removed from the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ...surgeon import Taps, attach, model_shape, reference_outputs
from ...surgeon.stopping import run_for_taps


@dataclass
class Divergence:
    """``raw``: ``[layer, head]`` VHD ``‖z(with span) − z(without)‖₂`` at the last position, mean
    over inputs; ``zeroed``: ``raw`` with the outliers of :func:`zero_outliers` set to 0;
    ``selected``: ``zeroed > median`` of its layer (VHR's reinforced heads); ``without_norm``:
    ``TA = ‖z(without)‖²``, mean over inputs."""

    raw: torch.Tensor
    zeroed: torch.Tensor
    selected: torch.Tensor
    without_norm: torch.Tensor


def zero_outliers(vhd: torch.Tensor, without_norm: torch.Tensor) -> torch.Tensor:
    """VHR's outlier removal on ``[layer, head]``: 0 where both ``VHD > μ+σ`` and ``TA > μ+σ``,
    μ and σ (unbiased) taken over the heads of each layer for each quantity."""
    def high(x: torch.Tensor) -> torch.Tensor:
        return x > x.mean(1, keepdim=True) + x.std(1, keepdim=True)
    return torch.where(high(vhd) & high(without_norm), torch.zeros_like(vhd), vhd)


@torch.no_grad()
def head_divergence(model, input_ids: torch.Tensor, span: tuple[int, int],
                    layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(VHD, TA)``, each ``[len(layers), heads]``, for one input ``[1, seq]`` and the span
    ``[start, stop)`` removed in the reference branch (which must leave the last token)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"head_divergence takes one input ([1, seq]), got batch {input_ids.shape[0]}")
    layers = list(range(model_shape(model).n_layers)) if layers is None else list(layers)
    without = reference_outputs(model, input_ids, span, layers)  # {layer: [1, H, D]}
    with attach(model, taps=Taps(head_outputs=layers)) as session:
        run_for_taps(model, input_ids=input_ids)
    vhd, ta = [], []
    for layer in layers:
        z_with = session.recording.head_output(layer)[0, -1].double()  # [H, D]
        z_without = without[layer][0].double()
        vhd.append((z_with - z_without).norm(dim=-1))
        ta.append(z_without.pow(2).sum(-1))
    return torch.stack(vhd), torch.stack(ta)


def context_divergence(model, windows: Sequence[torch.Tensor], span_fraction: float = 0.5,
                       progress: bool = False) -> Divergence:
    """VHD of every head over text ``windows`` (each ``[1, seq]``), the span being the window's
    leading ``span_fraction`` of tokens after the first (the first token, every head's sink, is
    kept: removing it would dominate every head's change). Mean over windows."""
    if not windows:
        raise ValueError("context_divergence needs at least one window")
    if not 0 < span_fraction < 1:
        raise ValueError(f"span_fraction must be in (0, 1), got {span_fraction}")
    vhd_total, ta_total = 0.0, 0.0
    for ids in tqdm(windows, desc="context divergence", disable=not progress, leave=False):
        stop = max(2, round(span_fraction * ids.shape[1]))
        if stop >= ids.shape[1]:
            raise ValueError(f"a {ids.shape[1]}-token window is too short for a span and a query")
        vhd, ta = head_divergence(model, ids, (1, stop))
        vhd_total, ta_total = vhd_total + vhd, ta_total + ta
    raw, ta = (vhd_total / len(windows)).float(), (ta_total / len(windows)).float()
    zeroed = zero_outliers(raw, ta)
    return Divergence(raw, zeroed, zeroed > zeroed.median(1, keepdim=True).values, ta)
