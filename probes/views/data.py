"""The compact data behind attention views: block-pooled maps of every viewed head, quantised
for the page, gathered layer group by layer group so long inputs never hold all maps at once.

A pooled map is the mean attention weight over a ``block × block`` square of (query, key)
cells (masked cells count as zero weight); ``block = 1`` is the exact map.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ...surgeon import Taps, attach, model_shape
from ...surgeon.plan import Plan
from ...surgeon.sites import has_causal_attention
from ...surgeon.stopping import run_until
from ..scorers.patterns import PATTERN_SCORES, pattern_scores
from ..scorers.record import AttentionRecord

TOKEN_CELLS = 512  # up to this many tokens a view shows one cell per token
MAX_SIDE = 1024  # pooled maps never exceed this many blocks per side
PAYLOAD_BYTES = 20 * 2**20  # default cap on the encoded maps of one page


@dataclass
class PooledMaps:
    """Block sums and cell counts of a set of heads, ``sums [head, side, side]`` and
    ``counts [side, side]``; the pooled mean is ``sums / counts``. Sums pool further exactly."""

    sums: torch.Tensor
    counts: torch.Tensor
    block: int
    n_tokens: int

    @classmethod
    def from_maps(cls, maps: torch.Tensor, block: int) -> "PooledMaps":
        """Pool ``maps [head, query, key]`` into ``block``-sized squares."""
        n = maps.shape[-1]
        side = math.ceil(n / block)
        pad = side * block - n
        padded = torch.nn.functional.pad(maps.float(), (0, pad, 0, pad))
        sums = padded.reshape(-1, side, block, side, block).sum(dim=(2, 4))
        ones = torch.nn.functional.pad(torch.ones(n, n), (0, pad, 0, pad))
        counts = ones.reshape(side, block, side, block).sum(dim=(1, 3))
        return cls(sums, counts, block, n)

    def coarser(self, factor: int) -> "PooledMaps":
        """The same maps pooled ``factor`` times coarser (exact: block sums add)."""
        side = self.counts.shape[-1]
        new_side = math.ceil(side / factor)
        pad = new_side * factor - side
        sums = torch.nn.functional.pad(self.sums, (0, pad, 0, pad))
        counts = torch.nn.functional.pad(self.counts, (0, pad, 0, pad))
        sums = sums.reshape(-1, new_side, factor, new_side, factor).sum(dim=(2, 4))
        counts = counts.reshape(new_side, factor, new_side, factor).sum(dim=(1, 3))
        return PooledMaps(sums, counts, self.block * factor, self.n_tokens)

    def means(self) -> torch.Tensor:
        """``[head, side, side]`` mean weight per block."""
        return self.sums / self.counts


def pool_block(n_tokens: int, token_cells: int = TOKEN_CELLS, max_side: int = MAX_SIDE) -> int:
    """Block size for ``n_tokens``: 1 (one cell per token) up to ``token_cells`` tokens, else at
    least 2 and large enough to keep the side at most ``max_side``."""
    if n_tokens <= token_cells:
        return 1
    return max(2, math.ceil(n_tokens / max_side))


def map_levels(n_tokens: int) -> int:
    """The square-root steps a view of ``n_tokens`` stores each weight in: ``⌊√n_tokens⌋``, at least 8
    and at most 255, so the smallest nonzero code (a map's largest weight over ``4·levels²``) stays
    below about a quarter of the uniform weight ``1/n_tokens``."""
    return min(255, max(8, math.isqrt(n_tokens)))


def _stored_cells(side: int, lower: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the cells a map stores, in storage order: the lower triangle (diagonal
    included) column by column, or every cell row by row."""
    if lower:
        cols, rows = torch.triu_indices(side, side)
        return rows, cols
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return rows.flatten(), cols.flatten()


def encode_maps(maps: Sequence[torch.Tensor], levels: int) -> dict:
    """Maps ``[side, side]`` of non-negative weights as one blob: per map the codes ``round(levels ·
    √(w / w_max))`` (one byte each) of its lower triangle column by column when every map is zero
    above the diagonal (a causal model's), else of every cell; all maps' codes zlib-compressed
    together and base64, with each map's ``w_max``. :func:`decode_maps` (and the page's script)
    reads them back to within half a step of ``√(w / w_max)``."""
    side = maps[0].shape[-1]
    lower = all(not m.triu(1).any() for m in maps)
    rows, cols = _stored_cells(side, lower)
    vmax = [float(f"{float(m.max()):.6g}") for m in maps]
    codes = [torch.round((m.double().clamp(min=0) / (v or 1.0)).sqrt().clamp(max=1) * levels)[rows, cols]
             for m, v in zip(maps, vmax)]
    blob = torch.cat(codes).to(torch.uint8).numpy().tobytes()
    return {"side": side, "layout": "lower" if lower else "full", "levels": levels, "vmax": vmax,
            "data": base64.b64encode(zlib.compress(blob, 6)).decode("ascii")}


def decode_maps(encoded: dict) -> list[torch.Tensor]:
    """Inverse of :func:`encode_maps`: ``[side, side]`` maps of ``w_max · (code / levels)²``."""
    side, levels = encoded["side"], encoded["levels"]
    rows, cols = _stored_cells(side, encoded["layout"] == "lower")
    codes = torch.from_numpy(np.frombuffer(zlib.decompress(base64.b64decode(encoded["data"])), np.uint8).copy())
    out = []
    for i, vmax in enumerate(encoded["vmax"]):
        values = torch.zeros(side, side)
        values[rows, cols] = (codes[i * len(rows):(i + 1) * len(rows)].float() / levels) ** 2 * vmax
        out.append(values)
    return out


@dataclass
class ViewData:
    """Everything a view page shows about one input: tokens, per-head pooled maps (before and,
    with a plan, after surgery) and per-head summary scores ``{name: [layer, head]}`` (NaN for
    heads not viewed)."""

    model_id: str
    tokens: list[str]
    layers: tuple[int, ...]
    n_heads: int
    n_kv_heads: int
    causal: bool
    before: dict[tuple[int, int], torch.Tensor]
    after: dict[tuple[int, int], torch.Tensor] | None
    block: int
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    plan_name: str | None = None

    def pooled(self, layer: int, head: int, compare: bool = False) -> torch.Tensor:
        """``[side, side]`` pooled mean map of one head (``compare``: after the plan)."""
        source = self.after if compare else self.before
        if source is None:
            raise ValueError("this view has no plan to compare with")
        if (layer, head) not in source:
            raise KeyError(f"layer {layer}, head {head} is not in this view (layers {list(self.layers)})")
        return source[(layer, head)]


def gather_view(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    model_id: str,
    layers: Sequence[int] | None = None,
    plan: Plan | None = None,
    payload_bytes: int = PAYLOAD_BYTES,
    progress: bool = True,
    plan_label: str | None = None,
) -> ViewData:
    """Record ``input_ids [1, seq]`` in one forward (two with ``plan``: without and with it),
    pooling and scoring each layer's maps as soon as they exist, so only one layer's fp32 maps
    are ever held; then coarsen the pooling until the encoded maps fit ``payload_bytes``."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"a view takes one input of shape [1, seq], got {tuple(input_ids.shape)}")
    shape = model_shape(model)
    n = input_ids.shape[-1]
    layers = tuple(range(shape.n_layers)) if layers is None else tuple(sorted(set(layers)))
    for layer in layers:
        if not 0 <= layer < shape.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has layers 0..{shape.n_layers - 1}")
    causal = has_causal_attention(model)
    block = pool_block(n)
    scores = {name: torch.full((shape.n_layers, shape.n_heads), math.nan) for name in PATTERN_SCORES}
    passes = {"before": None} if plan is None else {"before": None, "after": plan}
    pooled: dict[str, dict] = {}
    bar = tqdm(total=len(layers) * len(passes), desc="recording attention", unit="layer", disable=not progress)
    for name, applied in passes.items():
        target = pooled.setdefault(name, {})

        def consume(layer: int, probs: torch.Tensor, target=target, score=applied is None) -> None:
            maps = probs[0]  # [head, query, key]
            sums = PooledMaps.from_maps(maps, block)
            for head in range(maps.shape[0]):
                target[(layer, head)] = PooledMaps(sums.sums[head:head + 1], sums.counts, block, n)
            if score:
                _store_scores(pattern_scores(maps[None], causal), layer, scores)
            bar.update(1)

        taps = Taps(attention={layer: None for layer in layers}, map_budget_bytes=4 * shape.n_heads * n * n,
                    attention_consumer=consume)
        with torch.no_grad(), attach(model, applied, taps):
            run_until(model, max(layers), input_ids=input_ids)
    bar.close()
    before, after, block = _fit_payload(pooled["before"], pooled.get("after"), block, payload_bytes)
    tokens = [tokenizer.decode([i]) for i in input_ids[0].tolist()]
    return ViewData(model_id, tokens, layers, shape.n_heads, shape.n_kv_heads, causal, before, after, block,
                    scores, plan_label or describe_plan(plan))


def describe_plan(plan: Plan | None) -> str | None:
    """A short label of a plan's edits, e.g. ``calibrate L8 H(1, 2); head_scale L18 H(7,)``."""
    if plan is None:
        return None
    return "; ".join(f"{edit.kind} L{edit.layer} H{tuple(edit.heads)}" for edit in plan.edits) or "empty plan"


def view_data_from_record(record: AttentionRecord, n_kv_heads: int | None = None, causal: bool = True,
                          compare: AttentionRecord | None = None, payload_bytes: int = PAYLOAD_BYTES) -> ViewData:
    """A :class:`ViewData` from records already in memory (``compare``: the same input after surgery)."""
    n = len(record.tokens)
    block = pool_block(n)
    n_layers = max(record.layers) + 1
    n_heads = max(record.heads) + 1
    scores = {name: torch.full((n_layers, n_heads), math.nan) for name in PATTERN_SCORES}
    _score_record(record, causal, scores)

    def pooled(rec: AttentionRecord) -> dict:
        return {(l, h): PooledMaps.from_maps(rec.maps[i, j:j + 1], block)
                for i, l in enumerate(rec.layers) for j, h in enumerate(rec.heads)}

    before = pooled(record)
    after = pooled(compare) if compare is not None else None
    before, after, block = _fit_payload(before, after, block, payload_bytes)
    return ViewData(record.model_id, record.tokens, record.layers, n_heads, n_kv_heads or n_heads, causal,
                    before, after, block, scores)


def _score_record(record: AttentionRecord, causal: bool, scores: dict[str, torch.Tensor]) -> None:
    for i, layer in enumerate(record.layers):  # one layer at a time: the scores work in float64
        _store_scores(pattern_scores(record.maps[i:i + 1], causal), layer, scores, record.heads)


def _store_scores(layer_scores: dict[str, torch.Tensor], layer: int, scores: dict[str, torch.Tensor],
                  heads: Sequence[int] | None = None) -> None:
    """Copy ``{name: [1, head]}`` scores of one layer into the ``[layer, head]`` tables."""
    for name, values in layer_scores.items():
        for j, head in enumerate(heads if heads is not None else range(values.shape[1])):
            scores[name][layer, head] = values[0, j]


def _fit_payload(before: dict, after: dict | None, block: int, payload_bytes: int):
    """Coarsen the pooling by 2 until the encoded maps fit; returns mean maps and the block."""
    n_maps = len(before) * (2 if after is not None else 1)
    levels = map_levels(next(iter(before.values())).n_tokens)
    while True:
        sample = _sample(before)
        estimate = len(encode_maps([p.means()[0] for p in sample], levels)["data"]) / len(sample)
        if estimate * n_maps <= payload_bytes or next(iter(before.values())).counts.shape[-1] <= 16:
            break
        before = {k: p.coarser(2) for k, p in before.items()}
        after = {k: p.coarser(2) for k, p in after.items()} if after is not None else None
        block *= 2
    means = {k: p.means()[0] for k, p in before.items()}
    after_means = {k: p.means()[0] for k, p in after.items()} if after is not None else None
    return means, after_means, block


def _sample(maps: dict) -> list[PooledMaps]:
    """A few heads spread over the view, to estimate the encoded size of all."""
    values = list(maps.values())
    step = max(1, len(values) // 8)
    return values[::step]


__all__ = ["PooledMaps", "ViewData", "decode_maps", "encode_maps", "gather_view", "map_levels", "pool_block",
           "view_data_from_record"]
