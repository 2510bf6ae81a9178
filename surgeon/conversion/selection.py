"""Which heads of the converted layers keep softmax attention (head-level hybrids), and what a
converted model's cache holds.

Units: KV heads (a KV head keeps softmax with its query heads) or whole layers (every KV head of the
layer). Rules: a headlab score's ranking or RazorAttention's union (:func:`..streaming.rules.rule_ranking`;
a KV head scores the maximum over its query heads, a layer the maximum over its KV heads), ``uniform``
(evenly spaced over the candidates in layer order), ``random`` (a seeded order, the control) and
``kl`` (:func:`kl_greedy`: the unit whose softmax restored lowers the KL divergence to the original
model's next-token distribution most, repeated to the budget). A budget is a fraction of the units
(:func:`unit_count`) or of the original cache's bytes at a stated length (:func:`count_for_cache`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from ...core.errors import HeadlabError
from ...core.shape import model_shape
from ...kernels.linear_torch import window_starts
from ..compression.budget import cache_bytes_at, held_positions
from ..sites import full_attention_layers
from ..streaming.rules import rule_ranking
from .settings import LinearSettings

KL_RULE = "kl"

Unit = tuple[int, ...]  # (layer, KV head) for heads, (layer,) for layers


def candidate_units(layers: list[int], n_kv_heads: int, unit: str) -> list[Unit]:
    """Every unit of the converted ``layers``, in layer order."""
    if unit == "layers":
        return [(layer,) for layer in layers]
    return [(layer, kv) for layer in layers for kv in range(n_kv_heads)]


def unit_heads(units: list[Unit], n_kv_heads: int) -> tuple[tuple[int, int], ...]:
    """The ``(layer, KV head)`` pairs of ``units``, sorted."""
    pairs = {(u[0], kv) for u in units for kv in ((u[1],) if len(u) == 2 else range(n_kv_heads))}
    return tuple(sorted(pairs))


def unit_count(fraction: float, n_units: int) -> int:
    """``fraction`` of ``n_units``, rounded to the nearest count."""
    return math.floor(fraction * n_units + 0.5)


def static_ranking(rule: str, unit: str, layers: list[int], config, scores=None, seed: int = 0) -> list[Unit]:
    """The units of the converted ``layers`` ranked by a score name or ``razor`` (``scores``: a report's
    head scores) or ``random`` (seeded)."""
    shape = model_shape(config)
    units = candidate_units(layers, shape.n_kv_heads, unit)
    if rule == "random":
        order = list(units)
        random.Random(seed).shuffle(order)
        return order
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    heads = [head for head in rule_ranking(rule, scores, shape, layer_types, seed) if head[0] in layers]
    if unit == "heads":
        return heads
    return list(dict.fromkeys((layer,) for layer, _ in heads))  # a layer ranks where its best KV head does


def uniform_pick(units: list[Unit], count: int) -> list[Unit]:
    """``count`` of ``units`` spread evenly: the centres of ``count`` equal stretches of the list."""
    return [units[math.floor((i + 0.5) * len(units) / count)] for i in range(count)]


def kl_greedy(units: list[Unit], count: int, divergence: Callable[[list[Unit]], float],
              status: Callable[[str], None] | None = None) -> tuple[list[Unit], list[dict]]:
    """``(chosen, trace)``: ``count`` units chosen one at a time, each the unit whose addition to the
    chosen ones lowers ``divergence(chosen)`` most. Lazy evaluation: a unit's last measured gain bounds
    its next one (restoring softmax elsewhere is assumed not to raise what one unit can still gain), so
    each round re-measures only the units whose stale gain could still beat the best fresh one. The
    first round measures every unit. ``trace``: the divergence after each choice and how many
    divergences that round measured."""
    current = divergence([])
    gains = {u: math.inf for u in units}
    chosen: list[Unit] = []
    trace = [{"chosen": None, "kl": current, "measured": 1}]
    while len(chosen) < count and gains:
        fresh: set[Unit] = set()  # units measured this round
        while True:
            best = max(gains, key=lambda u: (gains[u], -units.index(u)))
            if best in fresh:  # its gain is current and beats every bound
                break
            if status is not None:
                status(f"softmax unit {len(chosen) + 1} of {count}: measuring {best}")
            gains[best] = current - divergence(chosen + [best])
            fresh.add(best)
        measured = len(fresh)
        chosen.append(best)
        current -= gains.pop(best)
        trace.append({"chosen": list(best), "kl": current, "measured": measured})
    return chosen, trace


def converted_cache_bytes(config, settings: LinearSettings, length: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a model converted with ``settings`` (its ``layers`` resolved) holds after ``length``
    tokens: unconverted layers their keys and values (sliding windows bounded), each converted layer
    its softmax heads' keys and values, its converted KV heads' window keys and values and its converted
    query heads' fp32 state ``[2F, D + 1]``."""
    shape = model_shape(config)
    size = torch.empty((), dtype=dtype).element_size()
    per_position = 2 * shape.head_dim * size  # one KV head's key and value
    held = held_positions(config, length)
    converted_layers = full_attention_layers(config) if settings.layers is None else settings.layers
    features = 2 * (settings.feature_dim if settings.feature_map == "lolcats" else shape.head_dim)
    window = (length - int(window_starts(torch.tensor(length), settings.window, settings.terrace))
              if settings.is_hybrid else 0)
    total = 0
    for layer in range(shape.n_layers):
        if layer not in converted_layers:
            total += held[layer] * shape.n_kv_heads * per_position
            continue
        softmax = len(settings.softmax_kv_heads(layer))
        converted = shape.n_kv_heads - softmax
        total += softmax * length * per_position + converted * window * per_position
        total += converted * shape.group_size * features * (shape.head_dim + 1) * 4
    return total


def count_for_cache(config, settings: LinearSettings, ranking: list[Unit], fraction: float, length: int) -> int:
    """The most units of ``ranking``, taken in order, that can keep softmax while the converted model's cache at
    ``length`` tokens stays within ``fraction`` of the original's bytes; refuses a budget that the
    conversion with no softmax unit already exceeds."""
    limit = fraction * cache_bytes_at(config, length)
    shape = model_shape(config)

    def bytes_with(n: int) -> int:
        kept = dataclasses.replace(settings, softmax_heads=unit_heads(ranking[:n], shape.n_kv_heads))
        return converted_cache_bytes(config, kept, length)

    if bytes_with(0) > limit:
        raise HeadlabError(f"--softmax-cache {fraction:g}: the conversion alone holds {bytes_with(0) / 2**20:.1f} MiB "
                           f"at {length} tokens, above {fraction:g} of the original's "
                           f"{cache_bytes_at(config, length) / 2**20:.1f} MiB; give at least "
                           f"{bytes_with(0) / cache_bytes_at(config, length):.3f}")
    count = 0
    while count < len(ranking) and bytes_with(count + 1) <= limit:
        count += 1
    return count




@dataclass(frozen=True)
class SoftmaxChoice:
    """What ``headlab convert`` keeps softmax: ``count`` units (``unit``) chosen by ``rule``; ``heads``
    the ``(layer, KV head)`` pairs, or None while the ``kl`` rule has yet to choose (after stage 1)."""

    rule: str
    unit: str
    count: int
    candidates: int
    heads: tuple[tuple[int, int], ...] | None

    def describe(self) -> str:
        what = "KV heads" if self.unit == "heads" else "layers"
        return f"{self.count} of {self.candidates} {what} of the converted layers keep softmax (rule {self.rule})"


def softmax_choice(settings, config, layers: list[int], scores=None) -> SoftmaxChoice:
    """The softmax units of a conversion (``settings``: :class:`.ConversionSettings` with a rule) of
    ``layers``, from the config alone (and ``scores`` for a score rule); refuses a budget that keeps
    nothing converted, or none softmax, in one line."""
    shape = model_shape(config)
    rule, unit = settings.softmax, settings.softmax_unit
    units = candidate_units(layers, shape.n_kv_heads, unit)
    ranked = rule not in (KL_RULE, "uniform")
    ranking = static_ranking(rule, unit, layers, config, scores, settings.seed) if ranked else units
    linear = settings.linear_settings(tuple(layers))
    if settings.softmax_cache is not None:  # every unit holds as many bytes as any other
        count = count_for_cache(config, linear, units, settings.softmax_cache, settings.cache_length)
        budget = f"--softmax-cache {settings.softmax_cache:g} at {settings.cache_length} tokens"
    else:
        count = unit_count(settings.softmax_keep, len(units))
        budget = f"--softmax-keep {settings.softmax_keep:g}"
    if count == 0:
        raise HeadlabError(f"{budget} keeps none of the {len(units)} {unit} softmax; give a larger budget or drop "
                           "--softmax-heads")
    if count >= len(units):
        raise HeadlabError(f"{budget} keeps all {len(units)} {unit} of the converted layers softmax: nothing would "
                           "be converted; give a smaller budget")
    chosen = None if rule == KL_RULE else uniform_pick(units, count) if rule == "uniform" else ranking[:count]
    heads = None if chosen is None else unit_heads(chosen, shape.n_kv_heads)
    return SoftmaxChoice(rule, unit, count, len(units), heads)


@torch.no_grad()
def next_token_log_probs(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[T, V]`` fp32 next-token log-probabilities of each ``[1, T]`` window (the KL rule's target)."""
    return [torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1) for ids in windows]


@torch.no_grad()
def mean_kl(model, windows: list[torch.Tensor], target: list[torch.Tensor]) -> float:
    """``KL(target ‖ model)`` of next-token distributions, averaged over every position of ``windows``."""
    from ..losses import next_token_kl

    total = sum(float(next_token_kl(want, model(ids, use_cache=False).logits[0])) for ids, want in zip(windows, target))
    return total / len(windows)


def use_softmax_heads(model, heads: tuple[tuple[int, int], ...]) -> LinearSettings:
    """Make ``heads`` (``(layer, KV head)`` pairs of converted layers) the model's softmax heads, in
    every converted layer and in the settings it records; returns those settings."""
    from .converted import converted_layers

    layers = converted_layers(model)
    settings = dataclasses.replace(next(iter(layers.values())).settings, softmax_heads=heads)
    for index, layer in layers.items():
        layer.settings = settings
        layer.set_softmax_heads(settings.softmax_kv_heads(index))
    return settings


def kl_selection(model, count: int, unit: str, windows: list[torch.Tensor], target: list[torch.Tensor],
                 status: Callable[[str], None] | None = None) -> tuple[tuple[tuple[int, int], ...], list[dict]]:
    """``(heads, trace)``: :func:`kl_greedy` over the units of ``model``'s converted layers, measuring
    ``KL(target ‖ model)`` on ``windows`` with each candidate's heads softmax; leaves ``model`` with the
    chosen heads softmax."""
    from .converted import converted_layers

    n_kv = model_shape(model).n_kv_heads
    units = candidate_units(sorted(converted_layers(model)), n_kv, unit)

    def divergence(chosen: list[Unit]) -> float:
        use_softmax_heads(model, unit_heads(chosen, n_kv))
        return mean_kl(model, windows, target)

    chosen, trace = kl_greedy(units, count, divergence, status)
    heads = unit_heads(chosen, n_kv)
    use_softmax_heads(model, heads)
    return heads, trace


__all__ = ["KL_RULE", "SoftmaxChoice", "candidate_units", "converted_cache_bytes", "count_for_cache",
           "kl_greedy", "kl_selection", "mean_kl", "next_token_log_probs", "softmax_choice", "static_ranking",
           "uniform_pick", "unit_count", "unit_heads", "use_softmax_heads"]
