"""Massive activations and the hidden-state sink score (docs/methods/sinks.md; sink tokens as VAR finds them).

Per layer, the residual stream entering the layer is logged (its three largest ``|x_d|`` with
their dimension and token, and the median ``|x|``); the sink dimensions are detected from the
same inputs (:func:`headlab.surgeon.detect_sink_dimensions`); a token ``j`` is a sink of layer
``l`` when ``φ(x_j) = max_{d∈D_sink} |x_d| / RMS(x_j) > τ``; a head's score is the attention
mass its rows put on the sink tokens of its layer, averaged over the rows that can see one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ...surgeon import Taps, attach, decoder_layers, detect_sink_dimensions, model_shape
from ...surgeon.sites import block_input, has_causal_attention
from ...surgeon.stopping import run_for_taps
from .record import scoring_method
from .settings import SinkSettings


@dataclass
class MassiveActivations:
    """What :func:`massive_activations` measured.

    ``top``: per layer, the three largest ``|x_d|`` of the layer's input as
    ``{"value", "dim", "token", "window"}``; ``median``: per layer, median ``|x|`` (mean over
    windows); ``sink_dims``: the detected dimensions; ``sink_tokens``: per layer, mean number of
    sink tokens per window; ``scores``: ``[layer, head]`` mass on sink tokens (NaN where no row
    saw one); ``method``: where the mass was read, ``"maps"`` or ``"statistics"``."""

    top: list[list[dict]]
    median: list[float]
    sink_dims: list[int]
    sink_tokens: list[float]
    scores: torch.Tensor
    settings: SinkSettings = field(default_factory=SinkSettings)
    method: str = "maps"

    def summary(self) -> dict:
        """JSON-ready record of everything but the scores."""
        return {"sink_dims": self.sink_dims, "top": self.top, "median": self.median,
                "sink_tokens_per_window": self.sink_tokens, "method": self.method, **self.settings.to_dict()}


def sink_token_mask(hidden: torch.Tensor, sink_dims: Sequence[int], tau: float) -> torch.Tensor:
    """``[batch, seq]`` bool: ``φ(x) = max_{d∈sink_dims}|x_d| / sqrt(mean(x²) + 1e-6) > tau`` for
    ``hidden [batch, seq, d_model]``."""
    if not sink_dims:
        return torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    x = hidden.float()
    rms = (x.pow(2).mean(-1) + 1e-6).sqrt()
    return x[..., list(sink_dims)].abs().amax(-1) / rms > tau


@torch.no_grad()
def massive_activations(model, windows: Sequence[torch.Tensor], settings: SinkSettings | None = None,
                        progress: bool = False) -> MassiveActivations:
    """Log massive activations, detect sink dimensions and score each head's mass on sink tokens
    over ``windows`` (each ``[1, seq]`` ids). Two passes per window: detection, then one forward
    reading the mass from attention maps consumed layer by layer or, for windows whose maps pass the
    budget (:func:`.record.scoring_method`), from the fused statistics op (no N×N map)."""
    settings = settings or SinkSettings()
    if not windows:
        raise ValueError("massive_activations needs at least one window")
    shape = model_shape(model)
    dims = detect_sink_dimensions(model, windows, settings.abs_min, settings.ratio_min,
                                  settings.min_fraction, settings.max_dims)
    mass = torch.zeros(shape.n_layers, shape.n_heads, dtype=torch.float64)
    rows = torch.zeros(shape.n_layers, dtype=torch.float64)
    tops: list[list[dict]] = [[] for _ in range(shape.n_layers)]
    medians = torch.zeros(shape.n_layers, dtype=torch.float64)
    sink_counts = torch.zeros(shape.n_layers, dtype=torch.float64)
    sinks: dict[int, torch.Tensor] = {}  # layer -> [seq]: its sink tokens in the current window
    groups: dict[int, torch.Tensor] = {}  # layer -> [1, 1, seq]: the same, as the statistics' key group

    def on_input(layer: int, window: int):
        def hook(module, args, kwargs):
            x = block_input(args, kwargs)[0].float()  # [seq, d_model]
            size = x.abs()
            values, flat = size.flatten().topk(min(3, size.numel()))
            tops[layer].extend({"value": v, "dim": i % x.shape[1], "token": i // x.shape[1], "window": window}
                               for v, i in zip(values.tolist(), flat.tolist()))
            medians[layer] += size.median().item()
            sinks[layer] = sink_token_mask(x[None], dims, settings.tau)[0]
            groups[layer] = sinks[layer][None, None]
            sink_counts[layer] += sinks[layer].sum().item()
        return hook

    def add_mass(layer: int, on_sinks: torch.Tensor) -> None:  # [heads, rows from the first that sees a sink]
        mass[layer] += on_sinks.double().sum(-1).cpu()
        rows[layer] += on_sinks.shape[-1]

    def first_row(sink: torch.Tensor) -> int:
        return int(sink.nonzero()[0]) if causal else 0

    def consume(layer: int, probs: torch.Tensor):  # [1, heads, query, key]
        sink = sinks[layer]
        if sink.any():
            add_mass(layer, probs[0, :, first_row(sink):, : sink.shape[0]][..., sink].sum(-1))

    def read_statistics(recording) -> None:  # group_mass [1, heads, query, 1]: each row's mass on the sinks
        for layer, sink in sinks.items():
            if sink.any():
                add_mass(layer, recording.stats[layer][0].group_mass[0, :, first_row(sink):, 0])

    causal = has_causal_attention(model)
    layers = decoder_layers(model)
    method = scoring_method(model, max(ids.shape[1] for ids in windows))
    taps = (Taps.all_attention(shape, attention_consumer=consume) if method == "maps" else
            Taps(stats={layer: None for layer in range(shape.n_layers)}, stats_key_groups=groups))
    for window, ids in enumerate(tqdm(windows, desc="massive activations", disable=not progress, leave=False)):
        hooks = [module.register_forward_pre_hook(on_input(layer, window), with_kwargs=True)
                 for layer, module in layers.items()]
        try:
            with attach(model, taps=taps) as session:
                run_for_taps(model, input_ids=ids)
        finally:
            for hook in hooks:
                hook.remove()
        if method == "statistics":
            read_statistics(session.recording)
    top = [sorted(entries, key=lambda e: -e["value"])[:3] for entries in tops]
    scores = torch.where(rows[:, None] > 0, mass / rows.clamp(min=1)[:, None], torch.nan).float()
    n = len(windows)
    return MassiveActivations(top, (medians / n).tolist(), dims, (sink_counts / n).tolist(), scores, settings, method)
