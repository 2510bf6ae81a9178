"""Recording what a session's taps ask for, beside the attention the model computes: fp32 maps of
the tapped heads (the edited ones where a plan changed them), row statistics from the fused op,
and per-head outputs. Shapes as in :mod:`.attention_math`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..core.shape import ModelShape
from ..kernels import attention_with_stats, row_key_probs
from . import attention_math
from .attention_math import AttentionCall
from .request import RequestState
from .taps import MapBudgetError, Recording, Taps

_MASK_CACHE_SIZE = 4  # distinct masks of one forward: full and sliding-window layers


class Recorder:
    """Records ``taps`` of a model of ``shape`` into :attr:`recording`; also decomposes each call's
    mask once (edits and statistics read the same decomposition)."""

    def __init__(self, shape: ModelShape, taps: Taps):
        self.shape, self.taps = shape, taps
        self.recording = Recording()
        self._map_bytes_this_call = 0
        self._mask_cache: list[tuple] = []  # (signature, mask, decomposition)

    def set_taps(self, taps: Taps) -> None:
        """Record ``taps`` from now on, starting a fresh recording."""
        taps.validate(self.shape)
        self.taps = taps
        self.recording.clear()

    def reads_scores(self, layer: int) -> bool:
        """Whether a tap on ``layer`` needs the attention scores (maps or statistics)."""
        return layer in self.taps.attention or layer in self.taps.stats

    def head_output(self, layer: int, out: torch.Tensor) -> None:
        """Keep ``out [B, N, H, D]`` when ``layer``'s head outputs are tapped."""
        if layer in self.taps.head_outputs:
            self.recording.head_outputs[layer].append(out.detach())

    def pattern(self, layer: int, probs: torch.Tensor, key_start: int = 0) -> None:
        """Record an attention pattern ``[B, H, Nq, Nk]`` computed elsewhere (a bridge's hook point),
        restricted to the tapped heads."""
        batch, _, n_query, n_key = probs.shape
        self.made_pattern(layer, (batch, n_query, n_key), lambda: probs, key_start)

    def made_pattern(self, layer: int, size: tuple[int, int, int], make, key_start: int = 0) -> None:
        """Record the pattern ``make()`` returns (``[B, H, Nq, Nk]``, ``size = (B, Nq, Nk)``; a
        converted layer's weights) when the layer is tapped, checking the map budget first."""
        heads = self.taps.attention_heads(layer, self.shape.n_heads)
        if heads is None:
            return
        batch, n_query, n_key = size
        self._count_map_bytes(layer, 4 * batch * len(heads) * n_query * n_key)
        self._keep(layer, heads, make()[:, list(heads)].detach().float(), key_start)

    def attention(self, layer, query, key, attention_mask, call, edited=None) -> None:
        """Record the tapped heads' maps: the edited ``(heads, probs)`` where the plan changed
        them, else recomputed in fp32 beside the model's own attention."""
        heads = self.taps.attention_heads(layer, self.shape.n_heads)
        if heads is None:
            return
        batch, _, n_query, _ = query.shape
        self._count_map_bytes(layer, 4 * batch * len(heads) * n_query * key.shape[-2])
        self.decomposed_mask(attention_mask, query, key, call)  # the model's mask must be what the call declares
        probs = attention_math.attention_probs(query, key, attention_mask, call, heads, query.shape[1] // key.shape[1])
        if edited is not None:
            edited_heads, edited_probs = edited
            for pos, head in enumerate(heads):
                if head in edited_heads:
                    probs[:, pos] = edited_probs[:, edited_heads.index(head)]
        self._keep(layer, heads, probs.detach(), call.key_start)

    def _count_map_bytes(self, layer: int, nbytes: int) -> None:
        """Add a layer's maps to this call's total (a forward's first tapped layer starts it; with a
        consumer each layer's maps are let go at once); raise :class:`MapBudgetError` over budget."""
        if layer == min(self.taps.attention) or self.taps.attention_consumer is not None:
            self._map_bytes_this_call = 0
        self._map_bytes_this_call += nbytes
        if self._map_bytes_this_call > self.taps.map_budget_bytes:
            raise MapBudgetError(
                f"recording attention maps needs {self._map_bytes_this_call / 2**20:.0f} MiB in this call, over "
                f"the budget of {self.taps.map_budget_bytes / 2**20:.0f} MiB; tap fewer layers/heads, use "
                "shorter inputs, or raise Taps.map_budget_bytes"
            )

    def _keep(self, layer: int, heads, probs: torch.Tensor, key_start: int) -> None:
        """Hand ``probs [B, len(heads), Nq, Nk]`` to the consumer, or keep them in the recording."""
        self.recording.attention_heads[layer] = heads
        if self.taps.attention_consumer is not None:
            self.taps.attention_consumer(layer, probs)
        else:
            self.recording.attention[layer].append(probs)
            self.recording.attention_key_start[layer].append(key_start)

    def stats(self, layer, query, key, value, attention_mask, call) -> None:
        """Record row statistics of the tapped heads (the layer's output is the model's own, computed
        apart: recording never changes what the model computes)."""
        heads = self.taps.stats_heads(layer, self.shape.n_heads)
        if heads is None:
            return
        key_valid, query_valid, q_offset = self.decomposed_mask(attention_mask, query, key, call)
        all_heads = len(heads) == self.shape.n_heads
        if all_heads:
            q, k, v = query, key, value
        else:  # a subset of query heads: give each its own copy of its KV head
            kv = attention_math.kv_heads_for(heads, query.shape[1] // key.shape[1])
            q, k, v = query[:, list(heads)], key[:, kv], value[:, kv]
        quirks = call.kernel_quirks(heads)
        stats = attention_with_stats(
            q, k, v, scale=call.scaling, causal=call.is_causal, q_offset=q_offset, key_valid=key_valid,
            key_groups=self._key_groups(layer, call.key_start, key.shape[-2]), topk=self.taps.stats_topk,
            columns=self.taps.stats_columns, query_valid=query_valid, backend=self.taps.stats_backend, **quirks,
        )
        if stats.topk_index is not None and call.key_start:  # sequence positions, as everywhere else
            stats.topk_index = torch.where(stats.topk_index >= 0, stats.topk_index + call.key_start, -1)
        # the recording keeps the statistics, not the output (30 layers of outputs at 8192 tokens
        # would add ~0.6 GB to SmolLM2's peak memory)
        self.recording.stats[layer].append(dataclasses.replace(stats, out=None, columns=None))
        if stats.columns is not None:
            self.recording.columns[layer].append(stats.columns)
        if self.taps.stats_row_offsets:
            self.recording.row_keys[layer].append(row_key_probs(
                q, k, stats.lse, self.taps.stats_row_offsets, scale=call.scaling, q_offset=q_offset,
                key_valid=key_valid, window=call.window, softcap=call.softcap,
            ))

    def decomposed_mask(self, attention_mask, query, key, call: AttentionCall):
        """:func:`attention_math.decompose_mask` of this call's mask under the call's window,
        computed once per mask (every layer of a kind receives the same mask tensor)."""
        signature = (tuple(query.shape), tuple(key.shape), call.is_causal, call.window)
        for cached_signature, cached_mask, result in self._mask_cache:
            if cached_mask is attention_mask and cached_signature == signature:
                return result
        key_valid, query_valid, q_offset = attention_math.decompose_mask(
            attention_mask, query.shape[-2], key.shape[-2], call.is_causal, query.device, call.window
        )
        result = (key_valid.expand(query.shape[0], -1), query_valid.expand(query.shape[0], -1), q_offset)
        self._mask_cache = [*self._mask_cache[-(_MASK_CACHE_SIZE - 1):], (signature, attention_mask, result)]
        return result

    def _key_groups(self, layer: int, key_start: int, n_key: int) -> torch.Tensor | None:
        """The requested key groups of ``layer`` (indexed by sequence position) for a call's keys."""
        groups = self.taps.stats_key_groups
        if isinstance(groups, Mapping):
            groups = groups.get(layer)
        return None if groups is None else RequestState.in_call(groups, key_start, n_key)


__all__ = ["Recorder"]
