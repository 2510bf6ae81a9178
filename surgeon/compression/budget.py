"""One budget axis for every press: the bytes an uncompressed cache holds at a length, every layer
counted (a sliding-window layer holds its window, a global layer every position), and what a press
may keep of it per compressed KV head. Checked before any weight is read: the functions take the
model's config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ...core.errors import HeadlabError
from ...core.shape import model_shape


def held_positions(config, length: int) -> list[int]:
    """Positions each layer's uncompressed cache holds after ``length`` tokens, as transformers' cache
    for this config holds them: all of them on a global layer, the last ``sliding_window − 1`` on a
    sliding-window layer."""
    layers = DynamicCache(config=config).layers
    return [min(length, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else length
            for layer in layers]


def global_layers(config) -> list[int]:
    """The layers whose cache holds every position (the ones a press compresses)."""
    return [index for index, layer in enumerate(DynamicCache(config=config).layers) if type(layer) is DynamicLayer]


def cache_bytes_at(config, length: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values the uncompressed cache holds after ``length`` tokens."""
    shape = model_shape(config)
    per_position = 2 * shape.n_kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()
    return sum(held_positions(config, length)) * per_position


@dataclass(frozen=True)
class HeadBudget:
    """What a press keeps per KV head of the global layers at a length: ``whole`` heads keep every
    position, each other head ``per_head`` positions on average (sinks and window included);
    ``fraction``: the whole cache's bytes kept, every layer counted."""

    length: int
    per_head: float
    whole: int
    compressed: int
    fraction: float


def head_budget(config, length: int, budget: float | None, tokens: int | None, whole: int, protected: int) -> HeadBudget:
    """The per-head budget of a press at ``length`` tokens, given as a ``budget`` fraction of the cache's
    bytes or ``tokens`` per global KV head on average; ``whole`` KV heads keep every position and
    ``protected`` (sinks + window) positions are kept by every other head. Refuses, in one line, a
    budget below what the sliding layers and whole heads already hold, or below ``protected``."""
    shape = model_shape(config)
    held = held_positions(config, length)
    layers = global_layers(config)
    n_global = len(layers) * shape.n_kv_heads
    fixed = sum(h for layer, h in enumerate(held) if layer not in layers) * shape.n_kv_heads  # sliding layers
    total = sum(held) * shape.n_kv_heads
    if not n_global:
        raise HeadlabError("this model has no global-attention layer to compress (its layers hold a window already)")
    compressed = n_global - whole
    allowed = budget * total - fixed if budget is not None else tokens * n_global
    spare = allowed - whole * length
    what = f"a budget of {budget:.1%} of the cache" if budget is not None else f"{tokens} tokens per KV head"
    if compressed == 0:
        per_head = 0.0
    else:
        per_head = spare / compressed
        least = min(max(protected, 1), length)  # the sinks and window (a head holding fewer keeps them all)
        if per_head < least:
            floor = (fixed + whole * length + compressed * least) / total
            raise HeadlabError(f"{what} at {length:,} tokens leaves {per_head:.0f} positions per compressed KV head, "
                               f"fewer than the {least} sinks and window each keeps; at this length the smallest "
                               f"budget is {math.ceil(floor * 1000) / 10:.1f}% of the cache")
    kept = fixed + whole * length + compressed * min(per_head, length)
    return HeadBudget(length, min(per_head, float(length)), whole, compressed, kept / total)


__all__ = ["HeadBudget", "cache_bytes_at", "global_layers", "head_budget", "held_positions"]
