"""Taps: what the attention hook records during a forward pass, and where it puts it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..core.errors import HeadlabError, PlanError
from ..core.kinds import Integer, Number
from ..core.shape import ModelShape

DEFAULT_MAP_BUDGET_BYTES = 2 * 1024**3


class MapBudgetError(HeadlabError, MemoryError):
    """Recording the requested attention maps would exceed the byte budget."""


@dataclass
class Taps:
    """What to record.

    ``attention``: layer -> query heads (``None`` = all heads) whose probabilities are recorded,
    ``[batch, heads, query, key]`` fp32 per call. ``head_outputs``: layers whose per-head outputs
    (the input of ``o_proj``, after any output edits) are recorded, ``[batch, seq, heads, head_dim]``.
    ``map_budget_bytes`` bounds the attention maps of one call, summed over layers.

    ``stats``: layer -> query heads whose row statistics are recorded without building the map
    (:func:`headlab.kernels.attention_with_stats`: LSE, entropy, mass on ``stats_key_groups``
    ``[batch, groups, key]`` — one tensor for every layer, or a mapping layer -> tensor read when the
    layer's call runs, so a hook before the layer can fill it — top-``stats_topk`` keys; with
    ``stats_columns`` also the attention
    each key receives, in ``Recording.columns``). One :class:`~headlab.kernels.AttentionStats` per
    call, heads along dim 1, without the attention output (``out`` is None; top-k indices are
    sequence positions). The layer's output is always the model's own attention, computed apart:
    no tap changes what the model computes (the logits of a tapped forward equal the untapped ones
    bit for bit). ``stats_row_offsets``:
    offsets ``d`` whose weights ``p[i, i - d]`` are recorded per row (1: previous token), in
    ``Recording.row_keys`` as ``[batch, heads, query, len(offsets)]``.

    ``attention_consumer``: when set, each layer's maps go to ``consumer(layer, probs)`` as soon as
    they exist instead of into the recording, and ``map_budget_bytes`` bounds one layer's maps, so
    a caller that reduces them (pooling, scores) holds one layer at a time.
    """

    attention: Mapping[int, Sequence[int] | None] = field(default_factory=dict)
    head_outputs: Iterable[int] = ()
    map_budget_bytes: int = DEFAULT_MAP_BUDGET_BYTES
    stats: Mapping[int, Sequence[int] | None] = field(default_factory=dict)
    stats_key_groups: torch.Tensor | Mapping[int, torch.Tensor] | None = None
    stats_topk: int = 0
    stats_columns: bool = False
    stats_row_offsets: tuple[int, ...] = ()
    stats_backend: str = "auto"
    attention_consumer: Callable[[int, torch.Tensor], None] | None = None

    def __post_init__(self):
        self.attention = _layer_heads(self.attention, "attention")
        self.head_outputs = frozenset(_index(layer, "head_outputs layer") for layer in self.head_outputs)
        self.stats = _layer_heads(self.stats, "stats")
        self.stats_row_offsets = tuple(_index(d, "stats_row_offsets") for d in self.stats_row_offsets)
        self.stats_topk = _index(self.stats_topk, "stats_topk")
        try:
            Number(0.0, low_open=True).check(self.map_budget_bytes)
        except ValueError as err:
            raise PlanError(f"Taps.map_budget_bytes: {err}") from None

    @classmethod
    def all_attention(cls, shape: ModelShape, **kwargs) -> "Taps":
        """Record every head of every layer."""
        return cls(attention={layer: None for layer in range(shape.n_layers)}, **kwargs)

    def validate(self, shape: ModelShape) -> None:
        """Raise :class:`PlanError` if a tapped layer or head does not exist in ``shape``."""
        for layer in set(self.attention) | set(self.head_outputs) | set(self.stats):
            if not 0 <= layer < shape.n_layers:
                raise PlanError(f"tap names layer {layer}, but the model has layers 0..{shape.n_layers - 1}")
        for layer, heads in (*self.attention.items(), *self.stats.items()):
            bad = [h for h in heads or () if not 0 <= h < shape.n_heads]
            if bad:
                raise PlanError(
                    f"attention tap on layer {layer} names head(s) {bad}, but the model has "
                    f"query heads 0..{shape.n_heads - 1}"
                )

    def attention_heads(self, layer: int, n_heads: int) -> tuple[int, ...] | None:
        """The heads whose maps are recorded on ``layer``, or None when the layer is not tapped."""
        return _heads(self.attention, layer, n_heads)

    def stats_heads(self, layer: int, n_heads: int) -> tuple[int, ...] | None:
        """The heads whose statistics are recorded on ``layer``, or None."""
        return _heads(self.stats, layer, n_heads)


def _index(value, what: str) -> int:
    """A non-negative integer (not a bool, not a fraction), else :class:`PlanError`."""
    try:
        return Integer(0).check(value)
    except ValueError as err:
        raise PlanError(f"Taps.{what}: {err}") from None


def _layer_heads(requests, what: str) -> dict[int, tuple[int, ...] | None]:
    """``{layer: heads or None}`` with every index checked."""
    if not isinstance(requests, Mapping):
        raise PlanError(f"Taps.{what} must map layers to head lists (or None), got {type(requests).__name__}")
    checked = {}
    for layer, heads in requests.items():
        if heads is not None:
            if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
                raise PlanError(f"Taps.{what}[{layer}]: {heads!r} is not a list of heads")
            heads = tuple(_index(h, f"{what}[{layer}] head") for h in heads)
        checked[_index(layer, f"{what} layer")] = heads
    return checked


def _heads(requests, layer: int, n_heads: int) -> tuple[int, ...] | None:
    if layer not in requests:
        return None
    heads = requests[layer]
    return tuple(range(n_heads)) if heads is None else heads


class Recording:
    """What taps captured, one entry per attention call (prefill, then each decode step)."""

    def __init__(self):
        self.attention: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.attention_heads: dict[int, tuple[int, ...]] = {}
        self.attention_key_start: dict[int, list[int]] = defaultdict(list)  # sequence position of each map's key 0
        self.head_outputs: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.stats: dict[int, list] = defaultdict(list)  # AttentionStats per call
        self.columns: dict[int, list] = defaultdict(list)  # ColumnStats per call
        self.row_keys: dict[int, list[torch.Tensor]] = defaultdict(list)  # [B, H, Nq, offsets] per call

    def attention_map(self, layer: int, call: int = 0) -> torch.Tensor:
        """Probabilities ``[batch, heads, query, key]`` of one call; heads as in ``attention_heads``.
        Key ``j`` is sequence position ``attention_key_start[layer][call] + j`` (0 + j except in
        the decode steps of a sliding-window layer, whose cache keeps only the window)."""
        return self.attention[layer][call]

    def head_output(self, layer: int, call: int | None = None) -> torch.Tensor:
        """Per-head outputs ``[batch, seq, heads, head_dim]``; ``call=None`` joins all calls along seq."""
        chunks = self.head_outputs[layer]
        return torch.cat(chunks, dim=1) if call is None else chunks[call]

    def clear(self) -> None:
        self.attention.clear()
        self.attention_heads.clear()
        self.attention_key_start.clear()
        self.head_outputs.clear()
        self.stats.clear()
        self.columns.clear()
        self.row_keys.clear()
