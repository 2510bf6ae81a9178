"""The head atlas: one pattern descriptor per head, every head of one or several models (or of a model
before and after a plan) embedded in 2D, clustered, and the clusters named by their dominant pattern.

A head's **descriptor**, averaged over the input windows (each layer's maps are reduced as soon as they
exist, one layer at a time, so windows of any length fit):

- ``locality [12]``: mean attention mass by distance ``|i − j|`` in log-spaced bins ``0, 1, 2–3, 4–7,
  …, ≥ 1024``;
- ``first``: mean mass on the first token; ``hidden_sinks``: mean mass on hidden sinks (keys whose
  mean received attention exceeds 0.1, the first token aside; the report's ``sink_hidden``);
- ``entropy [8]``: the distribution of row entropies (normalised by the log of the keys a row sees)
  over 8 bins of [0, 1];
- ``pooled [32, 32]``: the map averaged over blocks of normalised positions, each pooled row a
  distribution.

The embedding's input concatenates the blocks (the pooled map averaged down to 16 × 16), each divided
by the square root of its size so that every block weighs about the same. Three embeddings: a small
seeded autoencoder (its 2D code), PCA, and t-SNE (scikit-learn). Clusters: k-means on the
autoencoder's code, seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...core.head_scores import HeadScores
from ...surgeon import Plan, Taps, attach, model_shape
from ...surgeon.sites import has_causal_attention
from ...surgeon.stopping import run_until
from ..scorers.patterns import hidden_sink_mass

N_LOCALITY, N_ENTROPY, POOL = 12, 8, 32
ATLAS_FORMAT = "headlab-atlas/1"
PATTERNS = ("sink", "previous-token", "local window", "induction/retrieval", "broad")


@dataclass
class Descriptors:
    """Per head ``[layer, head, ...]``: ``locality [.., 12]``, ``first``, ``hidden_sinks``,
    ``entropy [.., 8]``, ``pooled [.., 32, 32]``; means over ``windows`` inputs."""

    locality: torch.Tensor
    first: torch.Tensor
    hidden_sinks: torch.Tensor
    entropy: torch.Tensor
    pooled: torch.Tensor
    windows: int = 1
    label: str = ""

    def features(self) -> torch.Tensor:
        """``[layer · head, F]``: the blocks concatenated (the pooled map at 16 × 16), each divided by
        the square root of its size."""
        layers, heads = self.first.shape
        coarse = torch.nn.functional.avg_pool2d(self.pooled.reshape(layers * heads, 1, POOL, POOL), 2)
        blocks = [self.locality.reshape(layers * heads, -1), self.first.reshape(-1, 1),
                  self.hidden_sinks.reshape(-1, 1), self.entropy.reshape(layers * heads, -1),
                  coarse.reshape(layers * heads, -1)]
        return torch.cat([b.float() / math.sqrt(b.shape[1]) for b in blocks], dim=1)

    def median_distance(self) -> torch.Tensor:
        """``[layer, head]``: the distance bin's lower edge below which half of the mass lies."""
        cumulative = self.locality.cumsum(-1)
        index = (cumulative < 0.5).sum(-1).clamp(max=N_LOCALITY - 1)
        edges = torch.tensor([0] + [2 ** (b - 1) for b in range(1, N_LOCALITY)], dtype=torch.float32)
        return edges[index]


def distance_bins(n_query: int, n_key: int, q_offset: int) -> torch.Tensor:
    """``[Nq, Nk]`` bin of each distance ``|i − j|``: 0 for 0, ``b`` for ``2^(b−1) ≤ d < 2^b``, the
    last bin for everything beyond."""
    rows = torch.arange(n_query)[:, None] + q_offset
    distance = (rows - torch.arange(n_key)[None, :]).abs()
    bins = torch.floor(torch.log2(distance.clamp(min=1).float())).long() + 1
    return torch.where(distance == 0, 0, bins).clamp(max=N_LOCALITY - 1)


def map_descriptors(maps: torch.Tensor, causal: bool) -> dict[str, torch.Tensor]:
    """The descriptor of each head of one input's maps ``[head, N, N]`` (``{name: [head, ...]}``)."""
    heads, n, _ = maps.shape
    maps = maps.float()
    bins = distance_bins(n, n, 0)
    locality = torch.zeros(heads, N_LOCALITY)
    locality.index_add_(1, bins.reshape(-1), maps.reshape(heads, -1))
    locality = locality / n  # mean over rows
    visible = torch.arange(1, n + 1).float() if causal else torch.full((n,), float(n))
    row_entropy = -torch.special.xlogy(maps, maps).sum(-1)  # [head, N]
    multi = visible > 1
    normalised = (row_entropy[:, multi] / visible[multi].log()).clamp(0, 1)
    entropy = torch.stack([torch.histc(row, N_ENTROPY, 0, 1) for row in normalised]) / max(1, int(multi.sum()))
    received = maps.sum(-2).double()  # [head, key]
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps[None], POOL)[0]  # [head, 32, 32] block means
    pooled = pooled / pooled.sum(-1, keepdim=True).clamp(min=1e-12)  # each pooled row a distribution
    return {"locality": locality, "first": maps[..., 0].mean(-1),
            "hidden_sinks": hidden_sink_mass(received[None], causal)[0].float(), "entropy": entropy,
            "pooled": pooled}


@torch.no_grad()
def describe_heads(model, windows: list[torch.Tensor], plan: Plan | None = None, label: str = "",
                   progress: bool = True) -> Descriptors:
    """The descriptors of every head of ``model`` (under ``plan``) over ``windows`` (each ``[1, n]``).
    Layers converted to linear attention are described by their converted form's weights (the
    hook's maps of converted layers)."""
    shape = model_shape(model)
    causal = has_causal_attention(model)
    sums: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(windows) * shape.n_layers, desc=f"describing heads{' ' + label if label else ''}",
               unit="layer", disable=not progress)

    def consume(layer: int, probs: torch.Tensor) -> None:
        for name, value in map_descriptors(probs[0], causal).items():
            target = sums.setdefault(name, torch.zeros(shape.n_layers, *value.shape, dtype=torch.float64))
            target[layer] += value.double()
        bar.update(1)

    try:
        for ids in windows:
            n = ids.shape[-1]
            taps = Taps.all_attention(shape, map_budget_bytes=4 * shape.n_heads * n * n, attention_consumer=consume)
            with attach(model, plan, taps):
                run_until(model, shape.n_layers - 1, input_ids=ids)
    finally:
        bar.close()
    means = {name: (value / len(windows)).float() for name, value in sums.items()}
    return Descriptors(**means, windows=len(windows), label=label)


def describe_models(specs: list[str], settings, plan: Plan | None = None, plan_label: str | None = None,
                    load: Callable | None = None) -> tuple[list[Descriptors], list[str]]:
    """``(descriptors, labels)`` of every head of each model of ``specs`` on the windows of
    ``settings.text`` (an :class:`~.settings.AtlasSettings`), the models loaded one at a time by
    ``load(spec) -> (model, tokenizer)`` (default :func:`headlab.surgeon.load_model`); with ``plan``
    (named ``plan_label``) each model again under the plan, on the same windows."""
    from ...core.text import text_windows

    if load is None:
        from ...surgeon import load_model as load
    sets, labels = [], []
    for spec in specs:
        model, tokenizer = load(spec)
        windows = text_windows(tokenizer, settings.text, settings.seed)
        sets.append(describe_heads(model, windows, label=spec))
        labels.append(spec)
        if plan is not None:
            sets.append(describe_heads(model, windows, plan, label="with the plan"))
            labels.append(f"{spec} with {plan_label or 'the plan'}")
        del model
    return sets, labels


def autoencoder_embedding(features: torch.Tensor, seed: int = 0, steps: int = 600, hidden: int = 32,
                          progress: bool = False) -> torch.Tensor:
    """``[n, 2]``: the 2D code of a small autoencoder (``F → hidden → 2 → hidden → F``, tanh) trained
    with Adam on the mean squared reconstruction of the standardised ``features [n, F]`` (``progress``:
    a bar over the steps)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    x = _standardised(features)
    def layer(i, o):
        lin = torch.nn.Linear(i, o)
        with torch.no_grad():
            bound = 1 / math.sqrt(i)
            lin.weight.uniform_(-bound, bound, generator=generator)
            lin.bias.zero_()
        return lin
    encoder = torch.nn.Sequential(layer(x.shape[1], hidden), torch.nn.Tanh(), layer(hidden, 2))
    decoder = torch.nn.Sequential(layer(2, hidden), torch.nn.Tanh(), layer(hidden, x.shape[1]))
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-2)
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc="atlas autoencoder", unit="step", disable=not progress, leave=False):
            optimizer.zero_grad()
            loss = (decoder(encoder(x)) - x).pow(2).mean()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return encoder(x)


def pca_embedding(features: torch.Tensor) -> torch.Tensor:
    """``[n, 2]``: the first two principal components of the standardised ``features``, signs fixed
    so that each component's largest loading is positive."""
    x = _standardised(features).double()
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    components = v[:2]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    return (x @ (components * signs).T).float()


def _standardised(features: torch.Tensor) -> torch.Tensor:
    x = features.float() - features.float().mean(0)
    return x / x.std(0).clamp(min=1e-6)


def kmeans(points: torch.Tensor, k: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """``[n]`` cluster of each of ``points [n, d]``: k-means (k-means++ start, seeded)."""
    k = min(k, points.shape[0])
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randint(points.shape[0], (1,), generator=generator)]
    while centres.shape[0] < k:
        distance = torch.cdist(points, centres).amin(1).pow(2)
        pick = torch.multinomial(distance / distance.sum() if distance.sum() > 0 else torch.ones_like(distance), 1,
                                 generator=generator)
        centres = torch.cat([centres, points[pick]])
    labels = torch.cdist(points, centres).argmin(1)
    for _ in range(iterations):
        centres = torch.stack([points[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
        new = torch.cdist(points, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def pattern_name(locality: torch.Tensor, first: float, hidden_sinks: float, retrieval: float | None = None) -> str:
    """The dominant pattern of a (mean) descriptor: ``sink`` (half of the mass on the first token and
    hidden sinks), ``previous-token`` (40% at distance 1), ``induction/retrieval`` (a mean
    induction or retrieval score of at least 0.2, when given), ``local window`` (60% within 7
    positions), else ``broad``."""
    if first + hidden_sinks >= 0.5:
        return "sink"
    if float(locality[1]) >= 0.4:
        return "previous-token"
    if retrieval is not None and retrieval >= 0.2:
        return "induction/retrieval"
    if float(locality[:4].sum()) >= 0.6:
        return "local window"
    return "broad"


@dataclass
class Atlas:
    """Every head of one or more descriptor sets in one embedding: ``points[method] [n, 2]`` for
    ``autoencoder``, ``pca`` and ``tsne``; ``heads``: ``(set index, layer, head)`` per point;
    ``clusters [n]`` and their ``names``."""

    descriptors: list[Descriptors]
    points: dict[str, torch.Tensor]
    heads: list[tuple[int, int, int]]
    clusters: torch.Tensor
    names: list[str]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n] (NaN where absent)

    def displacement(self, method: str = "autoencoder") -> torch.Tensor | None:
        """``[layer, head]``: how far each head of set 1 moved from set 0 (same shape only), else None."""
        if len(self.descriptors) != 2 or self.descriptors[0].first.shape != self.descriptors[1].first.shape:
            return None
        n = self.descriptors[0].first.numel()
        points = self.points[method]
        return (points[n:] - points[:n]).norm(dim=-1).reshape(self.descriptors[0].first.shape)


def build_atlas(descriptors: list[Descriptors], scores: list[dict[str, HeadScores]] | None = None,
                k: int = 6, seed: int = 0, progress: bool = False) -> Atlas:
    """Embed and cluster every head of ``descriptors`` together (``scores``: per set, for colouring
    and for naming induction/retrieval clusters; ``progress``: a bar over the autoencoder's steps and
    a line before t-SNE, one scikit-learn call)."""
    import sys

    from tqdm.auto import tqdm

    from .embedding import tsne_embedding

    features = torch.cat([d.features() for d in descriptors])
    heads = [(s, layer, head) for s, d in enumerate(descriptors)
             for layer in range(d.first.shape[0]) for head in range(d.first.shape[1])]
    code = autoencoder_embedding(features, seed, progress=progress)
    if progress:
        tqdm.write(f"t-SNE of {len(heads)} heads (one scikit-learn call, without progress of its own)",
                   file=sys.stderr)
    points = {"autoencoder": code, "pca": pca_embedding(features), "tsne": tsne_embedding(features, seed)}
    clusters = kmeans(_standardised(code), k, seed)
    merged = _score_columns(descriptors, scores or [{}] * len(descriptors))
    names = []
    for c in range(int(clusters.max()) + 1):
        members = clusters == c
        loc = torch.cat([d.locality.reshape(-1, N_LOCALITY) for d in descriptors])[members].mean(0)
        first = float(torch.cat([d.first.reshape(-1) for d in descriptors])[members].mean())
        sinks = float(torch.cat([d.hidden_sinks.reshape(-1) for d in descriptors])[members].mean())
        retrieval = [float(merged[name][members].nanmean()) for name in ("induction", "retrieval") if name in merged]
        retrieval = [r for r in retrieval if not math.isnan(r)]
        names.append(pattern_name(loc, first, sinks, max(retrieval) if retrieval else None))
    names = _distinct(names)
    return Atlas(descriptors, points, heads, clusters, names, merged)


def _score_columns(descriptors: list[Descriptors], scores: list[dict[str, HeadScores]]) -> dict[str, torch.Tensor]:
    names = sorted({name for per_set in scores for name in per_set})
    out = {}
    for name in names:
        columns = [per_set[name].values.reshape(-1).float() if name in per_set else
                   torch.full((d.first.numel(),), float("nan")) for d, per_set in zip(descriptors, scores)]
        out[name] = torch.cat(columns)
    return out


def _distinct(names: list[str]) -> list[str]:
    """``["sink", "sink", "broad"]`` -> ``["sink 1", "sink 2", "broad"]``."""
    counts = {name: names.count(name) for name in names}
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(f"{name} {seen[name]}" if counts[name] > 1 else name)
    return out



def atlas_document(atlas: Atlas, labels: list[str], settings: dict | None = None) -> dict:
    """The atlas as JSON (``atlas.json``): points, clusters and their table, every head's descriptor
    summary and pooled map (3 decimals), the layer trends of locality, and the displacement of a
    comparison."""
    first_all = torch.cat([d.first.reshape(-1) for d in atlas.descriptors])
    sinks_all = torch.cat([d.hidden_sinks.reshape(-1) for d in atlas.descriptors])
    median = torch.cat([d.median_distance().reshape(-1) for d in atlas.descriptors])
    pooled = torch.cat([d.pooled.reshape(-1, POOL, POOL) for d in atlas.descriptors])
    locality = torch.cat([d.locality.reshape(-1, N_LOCALITY) for d in atlas.descriptors])
    displacement = atlas.displacement()
    return {
        "format": ATLAS_FORMAT, "models": labels, "settings": settings or {},
        "heads": [list(h) for h in atlas.heads],
        "points": {method: _rounded(p) for method, p in atlas.points.items()},
        "clusters": atlas.clusters.tolist(), "names": atlas.names,
        "scores": {name: [None if math.isnan(v) else round(v, 4) for v in values.tolist()]
                   for name, values in atlas.scores.items()},
        "first": _rounded(first_all), "hidden_sinks": _rounded(sinks_all), "median_distance": median.tolist(),
        "locality": _rounded(locality), "pooled": _rounded(pooled),
        "layer_trends": {label: d.median_distance().median(-1).values.tolist()
                         for label, d in zip(labels, atlas.descriptors)},
        "cluster_table": cluster_table(atlas),
        "displacement": None if displacement is None else _rounded(displacement),
    }


def cluster_table(atlas: Atlas, examples: int = 5) -> list[dict]:
    """Per cluster: its name, size, the heads nearest its centre (``examples``), the mean of every
    score, and each score's separation: the share of the score's variance across heads that the
    clusters explain (η², 1 = the clusters sort the heads by that score exactly)."""
    code = atlas.points["autoencoder"]
    rows = []
    for c, name in enumerate(atlas.names):
        members = (atlas.clusters == c).nonzero()[:, 0]
        centre = code[members].mean(0)
        nearest = members[(code[members] - centre).norm(dim=-1).argsort()[:examples]]
        rows.append({"cluster": c, "name": name, "size": int(len(members)),
                     "examples": [list(atlas.heads[i]) for i in nearest.tolist()],
                     "score_means": {s: _nanmean(v[members]) for s, v in atlas.scores.items()}})
    separation = {s: _eta_squared(v, atlas.clusters) for s, v in atlas.scores.items()}
    for row in rows:
        row["separation"] = separation
    return rows


def _eta_squared(values: torch.Tensor, clusters: torch.Tensor) -> float | None:
    ok = ~torch.isnan(values)
    if ok.sum() < 3:
        return None
    v, c = values[ok].double(), clusters[ok]
    total = ((v - v.mean()) ** 2).sum()
    if total == 0:
        return None
    between = sum(((v[c == k].mean() - v.mean()) ** 2) * (c == k).sum() for k in c.unique())
    return round(float(between / total), 4)


def _nanmean(values: torch.Tensor) -> float | None:
    value = float(values.nanmean()) if (~torch.isnan(values)).any() else math.nan
    return None if math.isnan(value) else round(value, 4)


def _rounded(tensor: torch.Tensor):
    return torch.round(tensor.float() * 1000).div(1000).tolist()


__all__ = ["ATLAS_FORMAT", "Atlas", "Descriptors", "PATTERNS", "atlas_document", "autoencoder_embedding",
           "build_atlas", "cluster_table", "describe_heads", "distance_bins", "kmeans", "map_descriptors",
           "pattern_name", "pca_embedding"]
