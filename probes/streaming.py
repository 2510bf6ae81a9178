"""From a head score to streaming heads: the plan that keeps the whole context for the KV heads a
score ranks highest and streams every other KV head (RazorAttention's and DuoAttention's deployment).

A cache is per KV head, so a KV head scores the maximum over its query heads (RazorAttention takes the
maximum over each GQA group). Only layers with global attention are candidates: a sliding-window layer
already holds a bounded cache.
"""

from __future__ import annotations

import math

import torch

from ..surgeon.edit_kinds import Stream
from ..surgeon.errors import HeadlabError
from ..surgeon.plan import Plan
from ..surgeon.search.settings import StreamingSettings
from ..surgeon.shape import ModelShape
from .scores import HeadScores

SLIDING = "sliding_attention"  # transformers' layer type of a sliding-window layer


def kv_head_scores(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[layer, kv_head]``: the maximum of ``values [layer, head]`` over each KV head's query heads."""
    layers, heads = values.shape
    return values.reshape(layers, heads // group_size, group_size).amax(-1)


def global_layers(shape: ModelShape, layer_types: list[str] | None) -> list[int]:
    """The layers that attend to the whole context (every layer when the config names no types)."""
    if layer_types is None:
        return list(range(shape.n_layers))
    return [layer for layer, kind in enumerate(layer_types) if kind != SLIDING]


def full_kv_heads(score: HeadScores, shape: ModelShape, keep: float,
                  layer_types: list[str] | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(full, streaming)`` (layer, KV head) pairs of the global layers: the ``keep`` fraction
    (rounded to the nearest count) with the highest KV-head score keeps the whole context; ties go to
    the earlier layer and head."""
    layers = global_layers(shape, layer_types)
    values = kv_head_scores(score.values.float(), shape.group_size)[layers]  # [len(layers), kv]
    if torch.isnan(values).any():
        missing = sorted({layers[i] for i in torch.isnan(values).nonzero()[:, 0].tolist()})
        raise HeadlabError(f"score {score.name!r} is missing (NaN) on layer(s) {missing}; it cannot rank every head")
    candidates = [(layer, kv) for layer in layers for kv in range(shape.n_kv_heads)]
    n_full = math.floor(keep * len(candidates) + 0.5)
    order = sorted(range(len(candidates)), key=lambda i: -float(values.reshape(-1)[i]))  # stable: ties by position
    full = {candidates[i] for i in order[:n_full]}
    return sorted(full), [pair for pair in candidates if pair not in full]


def streaming_plan(score: HeadScores, shape: ModelShape, settings: StreamingSettings,
                   layer_types: list[str] | None = None, model_id: str | None = None) -> Plan:
    """The plan streaming every KV head of the global layers but the ``settings.keep`` fraction that
    ``score`` ranks highest: one :class:`Stream` edit per layer, on all query heads of its streaming KV heads."""
    _, streaming = full_kv_heads(score, shape, settings.keep, layer_types)
    group = shape.group_size
    edits = []
    for layer in sorted({layer for layer, _ in streaming}):
        heads = tuple(h for l, kv in streaming if l == layer for h in range(kv * group, (kv + 1) * group))
        edits.append(Stream(layer, heads, sinks=settings.sinks, window=settings.window))
    return Plan(edits, model=model_id, shape=shape)


__all__ = ["full_kv_heads", "global_layers", "kv_head_scores", "streaming_plan"]
