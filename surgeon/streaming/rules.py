"""From head scores to streaming heads: the plan that keeps the whole context for the KV heads a
selection rule ranks highest and streams every other KV head (RazorAttention's and DuoAttention's
deployment).

A cache is per KV head, so a KV head scores the maximum over its query heads (RazorAttention takes the
maximum over each GQA group). Only layers with global attention are candidates: a sliding-window layer
already holds a bounded cache. Rules: one score's ranking; RazorAttention's union of
its echo and induction rankings; a seeded random order (the control) (:func:`rule_ranking`).
"""

from __future__ import annotations

import math
import random

import torch

from ...core.errors import HeadlabError
from ...core.head_scores import HeadScores
from ...core.shape import ModelShape
from ..edits.stream import Stream
from ..plan import Plan
from .settings import StreamingSettings

SLIDING = "sliding_attention"  # transformers' layer type of a sliding-window layer
RAZOR_SCORES = ("echo", "razor_induction")
RAZOR_SHARES = (1, 14)  # RazorAttention keeps the top 1% by echo and the top 14% by induction

KVHead = tuple[int, int]  # (layer, KV head)


def kv_head_scores(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[layer, kv_head]``: the maximum of ``values [layer, head]`` over each KV head's query heads."""
    layers, heads = values.shape
    return values.reshape(layers, heads // group_size, group_size).amax(-1)


def global_layers(shape: ModelShape, layer_types: list[str] | None) -> list[int]:
    """The layers that attend to the whole context (every layer when the config names no types)."""
    if layer_types is None:
        return list(range(shape.n_layers))
    return [layer for layer, kind in enumerate(layer_types) if kind != SLIDING]


def candidates(shape: ModelShape, layer_types: list[str] | None = None) -> list[KVHead]:
    """Every KV head of the global layers, in layer order."""
    return [(layer, kv) for layer in global_layers(shape, layer_types) for kv in range(shape.n_kv_heads)]


def score_ranking(score: HeadScores, shape: ModelShape, layer_types: list[str] | None = None) -> list[KVHead]:
    """The candidates by KV-head score, highest first; ties go to the earlier layer and head."""
    layers = global_layers(shape, layer_types)
    values = kv_head_scores(score.values.float(), shape.group_size)[layers]  # [len(layers), kv]
    if torch.isnan(values).any():
        missing = sorted({layers[i] for i in torch.isnan(values).nonzero()[:, 0].tolist()})
        raise HeadlabError(f"score {score.name!r} is missing (NaN) on layer(s) {missing}; it cannot rank every head")
    pairs = candidates(shape, layer_types)
    flat = values.reshape(-1).tolist()
    return [pairs[i] for i in sorted(range(len(pairs)), key=lambda i: -flat[i])]  # stable: ties by position


def razor_ranking(echo: HeadScores, induction: HeadScores, shape: ModelShape,
                  layer_types: list[str] | None = None) -> list[KVHead]:
    """RazorAttention's union at any budget: the induction ranking, with the next echo head added
    after every 14 induction heads (so a prefix of 15% of the heads is the top 1% by echo and the
    top 14% by induction); a head already taken is skipped."""
    echo_order, induction_order = (score_ranking(s, shape, layer_types) for s in (echo, induction))
    share_echo, share_induction = RAZOR_SHARES
    order: list[KVHead] = []
    taken_induction = 0
    for head in induction_order:
        if taken_induction % share_induction == 0:
            order.extend(e for e in echo_order[taken_induction // share_induction * share_echo:][:share_echo]
                         if e not in order)
        if head not in order:
            order.append(head)
        taken_induction += 1
    return order + [head for head in echo_order if head not in order]


def random_ranking(shape: ModelShape, layer_types: list[str] | None = None, seed: int = 0) -> list[KVHead]:
    """The candidates in a random order drawn with ``seed`` (the control rule)."""
    order = candidates(shape, layer_types)
    random.Random(seed).shuffle(order)
    return order


def full_kv_heads(ranking: list[KVHead], keep: float) -> tuple[list[KVHead], list[KVHead]]:
    """``(full, streaming)``: the first ``keep`` fraction of ``ranking`` (rounded to the nearest
    count) keeps the whole context; both lists in layer order."""
    n_full = math.floor(keep * len(ranking) + 0.5)
    return sorted(ranking[:n_full]), sorted(ranking[n_full:])


def streaming_plan(ranking: list[KVHead], shape: ModelShape, settings: StreamingSettings,
                   model_id: str | None = None) -> Plan:
    """The plan streaming every ranked KV head but the first ``settings.keep`` fraction: one
    :class:`Stream` edit per layer, on all query heads of its streaming KV heads."""
    _, streaming = full_kv_heads(ranking, settings.keep)
    group = shape.group_size
    edits = []
    for layer in sorted({layer for layer, _ in streaming}):
        heads = tuple(h for l, kv in streaming if l == layer for h in range(kv * group, (kv + 1) * group))
        edits.append(Stream(layer, heads, sinks=settings.sinks, window=settings.window,
                            compensate=settings.compensate))
    return Plan(edits, model=model_id, shape=shape)


def rule_scores(rule: str) -> tuple[str, ...]:
    """The scores a selection rule reads: none (random), echo and razor_induction (razor), or itself."""
    return () if rule == "random" else RAZOR_SCORES if rule == "razor" else (rule,)


def rule_ranking(rule: str, scores: dict[str, HeadScores] | None, shape: ModelShape,
                 layer_types: list[str] | None = None, seed: int = 0) -> list[KVHead]:
    """The ranking of a selection rule: ``random`` (a seeded order), ``razor`` (the union of the
    echo and razor_induction scores) or the name of one score of ``scores``."""
    if rule == "random":
        return random_ranking(shape, layer_types, seed)
    needed = rule_scores(rule)
    rules = ("rules are 'random', 'razor' (echo and razor_induction, from the report's razor family) or the name of "
             "a score")
    if scores is None:
        raise HeadlabError(f"rule {rule!r} needs a scores file with {', '.join(needed)} (--scores); {rules}")
    missing = [name for name in needed if name not in scores]
    if missing:
        raise HeadlabError(f"the scores file has no score(s) {', '.join(missing)} for rule {rule!r} (it has "
                           f"{', '.join(scores)}); {rules}")
    for name in needed:
        if tuple(scores[name].values.shape) != (shape.n_layers, shape.n_heads):
            raise HeadlabError(f"score {name!r} has {tuple(scores[name].values.shape)} heads (layers x heads), the "
                               f"model {(shape.n_layers, shape.n_heads)}: head scores of another model")
    if rule == "razor":
        return razor_ranking(scores["echo"], scores["razor_induction"], shape, layer_types)
    return score_ranking(scores[rule], shape, layer_types)


__all__ = ["candidates", "full_kv_heads", "global_layers", "kv_head_scores", "random_ranking",
           "razor_ranking", "rule_ranking", "rule_scores", "score_ranking", "streaming_plan"]
