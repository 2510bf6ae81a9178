"""Data the edits need from extra passes: VAR's sink dimensions, VHR's no-span reference
outputs and the dataset-mean head outputs of mean ablation."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import torch

from ..core.shape import model_shape
from .hook import attach
from .plan import PlanError
from .sites import block_input, decoder_layers, has_causal_attention
from .stopping import run_for_taps
from .taps import Taps


@torch.no_grad()
def detect_sink_dimensions(
    model,
    inputs: Iterable[torch.Tensor],
    abs_min: float = 100.0,
    ratio_min: float = 1000.0,
    min_fraction: float = 0.5,
    max_dims: int = 4,
) -> list[int]:
    """VAR's sink dimensions (docs/methods/var.md) from calibration inputs (each ``[1, seq]`` ids).

    For each layer ≥ 2, a dimension of the residual stream entering the layer is marked on an
    input when its value at the first token has ``|x_d| > abs_min`` and ``|x_d| ≥ ratio_min ×
    median |x|``; the result keeps the dimensions marked in at least ``min_fraction`` of the
    inputs (over layers), most frequent first, at most ``max_dims``. The thresholds are the
    published ones and are (unverified) for other models: lower them for small models. With
    causal attention the first token's residual stream does not depend on the tokens after it,
    so only the first token of each input runs.
    """
    first_only = has_causal_attention(model)
    layers = decoder_layers(model)
    marks: Counter[int] = Counter()
    n_inputs = 0
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(_capture_first_token(captured), with_kwargs=True)
             for idx, layer in layers.items() if idx >= 2]
    try:
        for ids in inputs:
            captured.clear()
            run_for_taps(model, input_ids=ids[:, :1] if first_only else ids)
            n_inputs += 1
            marked = set()
            for first in captured:  # [d_model] per layer
                size = first.abs()
                hit = (size > abs_min) & (size >= ratio_min * size.median())
                marked.update(torch.nonzero(hit).flatten().tolist())
            marks.update(marked)
    finally:
        for hook in hooks:
            hook.remove()
    if n_inputs == 0:
        raise ValueError("detect_sink_dimensions needs at least one input")
    frequent = [d for d, count in marks.most_common() if count >= min_fraction * n_inputs]
    return frequent[:max_dims]


def _capture_first_token(store: list):
    def hook(module, args, kwargs):
        store.append(block_input(args, kwargs)[0, 0].detach().float())
    return hook


@torch.no_grad()
def reference_outputs(model, input_ids: torch.Tensor, span: tuple[int, int], layers: Sequence[int],
                      attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """VHR's reference: per-head outputs ``{layer: [B, H, D]}`` at the last position of the
    input with the span's tokens removed (the "without image" branch, unreinforced)."""
    start, stop = span
    if not 0 <= start < stop < input_ids.shape[1]:
        raise PlanError(f"span ({start}, {stop}) must be non-empty and end before the last token "
                        f"of the {input_ids.shape[1]}-token input")
    keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
    keep[start:stop] = False
    inputs = {"input_ids": input_ids[:, keep]}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask[:, keep]
    with attach(model, taps=Taps(head_outputs=layers)) as session:
        run_for_taps(model, **inputs)
    return {layer: session.recording.head_output(layer)[:, -1] for layer in layers}


@torch.no_grad()
def head_output_means(model, inputs: Iterable[torch.Tensor], layer: int, heads: Sequence[int]) -> list[list[float]]:
    """Dataset-mean output ``[len(heads)][head_dim]`` of the chosen heads over every position of
    ``inputs`` (each ``[1, seq]`` ids), for :class:`~headlab.surgeon.HeadMean`."""
    shape = model_shape(model)
    if any(not 0 <= h < shape.n_heads for h in heads):
        raise PlanError(f"heads {list(heads)} outside 0..{shape.n_heads - 1}")
    total, count = None, 0
    for ids in inputs:
        with attach(model, taps=Taps(head_outputs=[layer])) as session:
            run_for_taps(model, input_ids=ids)
        z = session.recording.head_output(layer)[0][:, list(heads)].double()  # [seq, h, D]
        total = z.sum(0) if total is None else total + z.sum(0)
        count += z.shape[0]
    if count == 0:
        raise ValueError("head_output_means needs at least one input")
    return (total / count).tolist()
