"""Masking validation (SPEC §4.9): mask the top-K heads of a score and K random heads from
outside its top ranks (several seeds), and measure a task metric for each. A score that names
heads the task needs drops the metric far more under top-K than under random-K."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..surgeon import HeadScale, Plan, attach
from ..surgeon.errors import InputFileError
from ..surgeon.evaluate import heldout_loss
from ..surgeon.escaping import html_text
from ..surgeon.files import GENERATOR_META, read_text_file, write_text
from ..surgeon.settings import Integer, Items, Kind, Number, Text, check_object
from .retrieval import retrieval_scores
from .scores import HeadScores
from .settings import METRICS, MaskingSettings, NeedleSettings



def load_curves(folder: str | Path) -> list[dict]:
    """The masking curves (``validation-*.json``) in a report folder, each checked: a malformed one
    raises :class:`InputFileError` naming it."""
    curves = []
    for path in sorted(Path(folder).glob("validation-*.json")):
        try:
            data = json.loads(read_text_file(path, "masking curve"))
        except json.JSONDecodeError as err:
            raise InputFileError(f"masking curve {path} is not JSON ({err.msg}); move it away or redo it") from None
        curve = check_object(data, str(path), _CURVE, _CURVE_OPTIONAL)
        n_k = len(curve["k"])
        if not (len(curve["top"]) == len(curve["random_mean"]) == len(curve["random"]) == n_k):
            raise InputFileError(f"{path}: k, top, random and random_mean differ in length")
        curves.append(curve)
    return curves


class _Values(Kind):
    """A list of finite numbers or nulls."""

    def check(self, value):
        if not isinstance(value, list):
            raise ValueError(f"{value!r} is not a list")
        return [None if v is None else Number().check(v) for v in value]


class _Rows(Kind):
    """A list of lists of finite numbers or nulls."""

    def check(self, value):
        if not isinstance(value, list):
            raise ValueError(f"{value!r} is not a list")
        return [_Values().check(row) for row in value]


_CURVE = {"score": Text(), "k": Items(Integer(1)), "baseline": Number(), "top": _Values(),
          "random": _Rows(), "random_mean": _Values()}
_CURVE_OPTIONAL = {"format": Text(), "settings": Kind(), "metric": Text(), "model_id": Text(), "random_heads": Kind(),
                   "top_heads": Kind()}


def write_curve_page(curve: dict, path: str | Path) -> Path:
    """The masking curve as a standalone page (plotly.js inlined)."""
    from . import views

    page = views.masking_figure(curve).to_html(include_plotlyjs=True, full_html=True)
    title = html_text(f"masking validation: {curve['score']}")
    return write_text(path, page.replace("<head>", f"<head>{GENERATOR_META}<title>{title}</title>", 1))


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
    result = {"format": "headlab-masking-curve/1", "score": score.name, "settings": asdict(settings), "k": ks,
              "baseline": metric(None),
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


__all__ = ["METRICS", "MaskingSettings", "load_curves", "loss_metric", "masking_curve", "masking_plan",
           "needle_recall_metric", "random_heads", "write_curve_page"]
