"""Masking validation (SPEC §4.9): mask the top-K heads of a score and K random heads from
outside its top ranks (several seeds), and measure a task metric for each. A score that names
heads the task needs drops the metric far more under top-K than under random-K."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..surgeon import HeadScale, Plan, attach
from ..surgeon.evaluate import heldout_loss
from .retrieval import NeedleSettings, retrieval_scores
from .scores import HeadScores

METRICS = ("needle-recall", "loss")


@dataclass
class MaskingSettings:
    """K values, random seeds and where random heads come from (outside the top ``exclude_top``,
    reduced when the model has too few heads to leave K). Masking is zero ablation (scale 0)."""

    ks: tuple[int, ...] = (5, 10, 20)
    seeds: int = 3
    exclude_top: int = 100
    metric: str = "needle-recall"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, not {self.metric!r}")
        if self.seeds < 1 or not self.ks or min(self.ks) < 1:
            raise ValueError("need at least one seed and K values >= 1")


def masking_plan(heads: list[tuple[int, int]]) -> Plan:
    """Zero-ablate ``heads`` (one HeadScale edit per layer)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return Plan([HeadScale(layer, tuple(sorted(h)), 0.0) for layer, h in sorted(by_layer.items())])


def random_heads(score: HeadScores, k: int, seed: int, exclude_top: int) -> list[tuple[int, int]]:
    """``k`` heads drawn with ``seed`` from outside the score's top ``exclude_top`` (fewer
    excluded when needed so that ``k`` remain)."""
    n_layers, n_heads = score.values.shape
    total = n_layers * n_heads
    if k > total:
        raise ValueError(f"cannot mask {k} heads: the model has {total}")
    excluded = {(l, h) for l, h, _ in score.top(min(exclude_top, total - k))}
    pool = [(l, h) for l in range(n_layers) for h in range(n_heads) if (l, h) not in excluded]
    return sorted(random.Random(seed).sample(pool, k))


def masking_curve(score: HeadScores, metric: Callable[[Plan | None], float], settings: MaskingSettings,
                  progress: bool = True) -> dict:
    """The metric unmasked, under top-K and under random-K masking for every K."""
    ks = list(settings.ks)
    jobs = [("top", k, None) for k in ks] + [("random", k, s) for k in ks for s in range(settings.seeds)]
    result = {"score": score.name, "settings": asdict(settings), "k": ks, "baseline": metric(None),
              "top": [None] * len(ks), "random": [[None] * settings.seeds for _ in ks],
              "top_heads": {}, "random_heads": {}}
    for kind, k, seed in tqdm(jobs, desc=f"masking {score.name}", unit="run", disable=not progress):
        i = ks.index(k)
        if kind == "top":
            heads = [(l, h) for l, h, _ in score.top(k)]
            result["top"][i] = metric(masking_plan(heads))
            result["top_heads"][str(k)] = heads
        else:
            heads = random_heads(score, k, seed, settings.exclude_top)
            result["random"][i][seed] = metric(masking_plan(heads))
            result["random_heads"][f"{k}/{seed}"] = heads
    result["random_mean"] = [sum(r) / len(r) for r in result["random"]]
    return result


def needle_recall_metric(model, tokenizer, needles: NeedleSettings, progress: bool = False):
    """Metric: fraction of NIAH runs whose answer is recalled."""
    return lambda plan: retrieval_scores(model, tokenizer, needles, plan, progress, record=False).recall


def loss_metric(model, windows: list[torch.Tensor]):
    """Metric: mean next-token cross-entropy over ``windows`` (each ``[1, seq]``)."""
    @torch.no_grad()
    def metric(plan: Plan | None) -> float:
        with attach(model, plan):
            return heldout_loss(model, windows)
    return metric


__all__ = ["METRICS", "MaskingSettings", "loss_metric", "masking_curve", "masking_plan", "needle_recall_metric",
           "random_heads"]
