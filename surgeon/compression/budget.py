"""One budget axis for every press: the bytes an uncompressed cache holds at a length, every layer
counted (a sliding-window layer holds its window, a global layer every position), and what a press
may keep of it per compressed KV head. Checked before any weight is read: the functions take the
model's config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from ...core.errors import HeadlabError
from ...core.shape import model_shape
from ..sites import full_attention_layers


def held_positions(config, length: int) -> list[int]:
    """Positions each layer's uncompressed cache holds after ``length`` tokens, as transformers' cache
    for this config holds them: all of them on a global layer, the last ``sliding_window − 1`` on a
    sliding-window layer."""
    layers = DynamicCache(config=config).layers
    return [min(length, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else length
            for layer in layers]


def cache_bytes_at(config, length: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values the uncompressed cache holds after ``length`` tokens."""
    shape = model_shape(config)
    per_position = 2 * shape.n_kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()
    return sum(held_positions(config, length)) * per_position


@dataclass(frozen=True)
class HeadBudget:
    """What a press keeps per KV head at a length: ``whole`` global heads keep every position, each
    other global head ``per_head`` positions on average (sinks and window included), and each head of
    sliding-window layer ``l`` ``per_sliding[l]`` (None: the sliding layers keep their windows whole, as
    under a budget in tokens); ``fraction``: the whole cache's bytes kept,
    every layer counted."""

    length: int
    per_head: float
    whole: int
    compressed: int
    fraction: float
    per_sliding: dict[int, float] | None = None


def head_budget(config, length: int, budget: float | None, tokens: int | None, whole: int, protected: int) -> HeadBudget:
    """The per-head budget of a press at ``length`` tokens, given as a ``budget`` fraction of the cache's
    bytes or ``tokens`` per global KV head on average; ``whole`` global KV heads keep every position and
    ``protected`` (sinks + window) positions are kept by every other head. Under a ``budget`` every
    sliding-window layer keeps the budget's share of its window (as every layer does without whole
    heads); under ``tokens`` the sliding layers keep their windows. Refuses, in one line, a budget below what the whole heads and
    every compressed head's sinks and window hold, naming the smallest budget at this length."""
    shape = model_shape(config)
    held = held_positions(config, length)
    layers = full_attention_layers(config)
    if not layers:
        raise HeadlabError("this model has no global-attention layer to compress (its layers hold a window already)")
    kv = shape.n_kv_heads
    sliding = {layer: h for layer, h in enumerate(held) if layer not in layers}
    total = sum(held) * kv
    compressed = len(layers) * kv - whole
    least = min(max(protected, 1), length)  # the sinks and window (a head holding fewer keeps them all)
    fixed = sum(sliding.values()) * kv
    allowed = budget * total if budget is not None else tokens * len(layers) * kv + fixed
    per_sliding = None
    if budget is not None and sliding:  # every sliding layer keeps the budget's share of its window
        per_sliding = {layer: max(min(protected, h), budget * h) for layer, h in sliding.items()}
        fixed = sum(per_sliding.values()) * kv
    per_head = (allowed - fixed - whole * length) / compressed if compressed else 0.0
    if compressed and per_head < least - 1e-9:
        if budget is None:
            floor = (fixed + whole * length + compressed * least) / total
        else:  # the smallest fraction whose share leaves each compressed head its sinks and window
            def spare(fraction: float) -> float:
                kept_sliding = sum(max(min(protected, h), fraction * h) for h in sliding.values()) * kv
                return fraction * total - kept_sliding - whole * length - compressed * least
            low, high = 0.0, 1.0
            for _ in range(40):
                low, high = (low, (low + high) / 2) if spare((low + high) / 2) >= 0 else ((low + high) / 2, high)
            floor = high
        what = f"a budget of {budget:.1%} of the cache" if budget is not None else f"{tokens} tokens per KV head"
        raise HeadlabError(f"{what} at {length:,} tokens leaves {max(per_head, 0):.0f} positions per compressed KV head, "
                           f"fewer than the {least} sinks and window each keeps; at this length the smallest budget "
                           f"is {math.ceil(floor * 1000) / 10:.1f}% of the cache")
    per_head = min(per_head, float(length))
    kept = fixed + whole * length + compressed * per_head
    return HeadBudget(length, per_head, whole, compressed, kept / total, per_sliding)


__all__ = ["HeadBudget", "cache_bytes_at", "head_budget", "held_positions"]
