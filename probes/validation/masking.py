"""Which heads a masking validation masks, and how: the top-K heads of a score, random control
sets matched by layer to them, and the plan of each masking mode (:data:`.settings.MASKING_MODES`).

Heads are ``(layer, head)`` pairs throughout.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import torch
from tqdm.auto import tqdm

from ...core.errors import HeadlabError
from ...core.head_scores import HeadScores
from ...surgeon import HeadMean, HeadScale, Plan, Taps, Uniform, attach
from ...surgeon.stopping import run_for_taps

Head = tuple[int, int]


def top_heads(score: HeadScores, k: int) -> list[Head]:
    """The score's ``k`` highest heads (NaN never ranks); fewer than ``k`` scored heads is an error."""
    heads = [(layer, head) for layer, head, _ in score.top(k)]
    if len(heads) < k:
        raise HeadlabError(f"cannot mask the top {k} heads of {score.name}: only {len(heads)} heads have a score")
    return heads


def eligible_heads(score: HeadScores, top: list[Head], exclude_above: float | None) -> set[Head]:
    """The heads a random control set may draw: not in ``top`` and not scoring above ``exclude_above``
    (a head without a score is eligible)."""
    n_layers, n_heads = score.values.shape
    values = score.values.tolist()
    return {(layer, head) for layer in range(n_layers) for head in range(n_heads)
            if (layer, head) not in top and not (exclude_above is not None and not math.isnan(values[layer][head])
                                                  and values[layer][head] > exclude_above)}


def matched_random_set(top: list[Head], eligible: set[Head], rng: random.Random) -> list[Head]:
    """A random set with as many heads in each layer as ``top`` has, drawn without replacement from
    ``eligible``; where a layer has too few eligible heads, the rest come from the nearest layers
    (the lower one first on a tie)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(eligible):
        by_layer.setdefault(layer, []).append(head)
    if len(eligible) < len(top):
        raise HeadlabError(f"a random set of {len(top)} heads needs that many eligible heads; there are "
                           f"{len(eligible)} (lower --ks or raise --exclude-above)")
    chosen: list[Head] = []
    for layer, count in sorted(Counter(layer for layer, _ in top).items()):
        for source in sorted(by_layer, key=lambda other: (abs(other - layer), other)):
            pool = by_layer[source]
            take = rng.sample(pool, min(count, len(pool)))
            for head in take:
                pool.remove(head)
            chosen += [(source, head) for head in take]
            count -= len(take)
            if count == 0:
                break
    return sorted(chosen)


def random_sets(score: HeadScores, top: list[Head], n_sets: int, exclude_above: float | None,
                seed: int) -> list[list[Head]]:
    """``n_sets`` random control sets for ``top`` (:func:`matched_random_set`), reproducible from
    ``seed`` and the number of heads."""
    eligible = eligible_heads(score, top, exclude_above)
    rng = random.Random(f"{seed}/{len(top)}")
    return [matched_random_set(top, eligible, rng) for _ in range(n_sets)]


def masking_plan(heads: list[Head], mode: str, rows: str = "decode",
                 means: dict[Head, list[float]] | None = None) -> Plan:
    """The plan masking ``heads``: ``uniform`` (:class:`~headlab.surgeon.Uniform` on ``rows``),
    ``zero`` (:class:`~headlab.surgeon.HeadScale` 0) or ``mean`` (:class:`~headlab.surgeon.HeadMean`
    with ``means``); one edit per layer."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    edits = []
    for layer, chosen in sorted(by_layer.items()):
        chosen = tuple(sorted(chosen))
        if mode == "uniform":
            edits.append(Uniform(layer, chosen, rows=rows))
        elif mode == "zero":
            edits.append(HeadScale(layer, chosen, 0.0))
        elif mode == "mean":
            if means is None:
                raise ValueError("mean masking needs the heads' means (head_means)")
            edits.append(HeadMean(layer, chosen, tuple(tuple(means[(layer, h)]) for h in chosen)))
        else:
            raise ValueError(f"unknown masking mode {mode!r}")
    return Plan(edits)


@torch.no_grad()
def head_means(model, windows: list[torch.Tensor], heads: set[Head], progress: bool = False) -> dict[Head, list[float]]:
    """Mean output ``[head_dim]`` of each of ``heads`` over every position of ``windows`` (each
    ``[1, seq]`` ids), one forward per window (``progress``: a bar over them)."""
    layers = sorted({layer for layer, _ in heads})
    totals: dict[int, torch.Tensor] = {}
    count = 0
    for ids in tqdm(windows, desc="head means", unit="window", leave=False, disable=not progress):
        with attach(model, taps=Taps(head_outputs=layers)) as session:
            run_for_taps(model, input_ids=ids)
        for layer in layers:
            z = session.recording.head_output(layer)[0].double().sum(0)  # [heads, head_dim]
            totals[layer] = z if layer not in totals else totals[layer] + z
        count += ids.shape[1]
    return {(layer, head): (totals[layer][head] / count).tolist() for layer, head in heads}


__all__ = ["eligible_heads", "head_means", "masking_plan", "matched_random_set", "random_sets", "top_heads"]
