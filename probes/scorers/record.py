"""Attention records: per-head attention maps with named dimensions, captured through the hook."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...surgeon import Taps, attach, model_shape
from ...surgeon.plan import Plan
from ...surgeon.stopping import run_for_taps, run_until
from ...surgeon.taps import DEFAULT_MAP_BUDGET_BYTES

DIMS = ("layer", "head", "query", "key")


def scoring_method(model_or_config, n_tokens: int) -> str:
    """``"maps"`` when one window's maps (all layers and heads, fp32) fit the taps' map budget,
    else ``"statistics"`` (the fused op: no N×N map; the report's pattern and sink scores from it)."""
    shape = model_shape(model_or_config)
    return "maps" if 4 * shape.n_layers * shape.n_heads * n_tokens**2 <= DEFAULT_MAP_BUDGET_BYTES else "statistics"


@dataclass
class AttentionRecord:
    """Attention probabilities of one input, ``maps [layer, head, query, key]`` (fp32).

    ``layers``/``heads`` give the model's indices along the first two dimensions; ``tokens`` the
    token strings along query and key.
    """

    maps: torch.Tensor
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    tokens: list[str]
    input_ids: torch.Tensor  # [seq]
    model_id: str
    dims: tuple[str, ...] = DIMS


def record_attention(
    model,
    input_ids: torch.Tensor,
    tokenizer=None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    plan: Plan | None = None,
    map_budget_bytes: int | None = None,
) -> AttentionRecord:
    """Record the attention maps of one unpadded input ``input_ids [1, seq]``.

    ``layers``/``heads`` default to all; ``plan`` applies edits while recording. Raises
    :class:`headlab.surgeon.MapBudgetError` when the maps would exceed ``map_budget_bytes``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"record_attention takes one input of shape [1, seq], got {tuple(input_ids.shape)}")
    shape = model_shape(model)
    layers = tuple(range(shape.n_layers)) if layers is None else tuple(layers)
    heads = tuple(range(shape.n_heads)) if heads is None else tuple(heads)
    extra = {} if map_budget_bytes is None else {"map_budget_bytes": map_budget_bytes}
    taps = Taps(attention={layer: heads for layer in layers}, **extra)
    with torch.no_grad(), attach(model, plan, taps) as session:
        run_until(model, max(layers), input_ids=input_ids)  # later layers cannot change these maps
    maps = torch.stack([session.recording.attention_map(layer)[0] for layer in layers])
    ids = input_ids[0]
    tokens = [tokenizer.decode([i]) if tokenizer is not None else str(i) for i in ids.tolist()]
    return AttentionRecord(maps, layers, heads, tokens, ids, str(getattr(model, "name_or_path", "")))


def record_statistics(model, input_ids: torch.Tensor, layers: Sequence[int] | None = None,
                      plan: Plan | None = None, backend: str = "auto") -> dict[int, dict[str, torch.Tensor]]:
    """Per-row attention statistics of every head of one unpadded input ``[1, seq]`` without
    building maps (the fused statistics op through the hook): ``{layer: {"entropy", "first_token",
    "previous_token", "top_weight"}}``, each ``[head, query]``. Memory is O(heads·seq) per layer,
    so long inputs (SmolLM2 at 8192 tokens) fit where maps (~72 GB) do not.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"record_statistics takes one input of shape [1, seq], got {tuple(input_ids.shape)}")
    shape = model_shape(model)
    layers = tuple(range(shape.n_layers)) if layers is None else tuple(layers)
    first = torch.zeros(1, 1, input_ids.shape[1], dtype=torch.bool)
    first[..., 0] = True
    taps = Taps(stats={layer: None for layer in layers}, stats_key_groups=first, stats_topk=1,
                stats_row_offsets=(1,), stats_backend=backend)
    with torch.no_grad(), attach(model, plan, taps) as session:
        run_for_taps(model, input_ids=input_ids)
    out = {}
    for layer in layers:
        stats = session.recording.stats[layer][0]
        out[layer] = {
            "entropy": stats.entropy[0],
            "first_token": stats.group_mass[0, :, :, 0],
            "previous_token": session.recording.row_keys[layer][0][0, :, :, 0],
            "top_weight": stats.topk_weight[0, :, :, 0],
        }
    return out
