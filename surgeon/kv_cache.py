"""Decoding caches that do not copy themselves every step, and what a cache holds.

transformers' ``DynamicLayer`` concatenates a new key and value tensor at every decode step, so a
step at ``n`` cached positions copies ``2 · n`` rows per layer (on SmolLM2 at 4096 tokens, a fifth of
a decode step's time). :func:`reserved_cache` builds the model's usual cache with its full-attention
layers replaced by :class:`ReservedLayer`, which writes new positions into room kept ahead of time.
Sliding-window layers stay as transformers builds them (they hold a window, not the sequence).
For decoding without gradients: positions are written in place. :class:`SharedRooms` puts several
sequences' reserved room in one buffer, so that sequences prefilled one by one decode as one batch.

:func:`cache_bytes` counts what any cache holds between calls (the streaming cache of
:mod:`.streaming.cache` and a converted layer's state included).
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .sites import full_attention_layers


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer whose ``keys``/``values`` ``[batch, kv_heads, n, head_dim]`` are
    views of a buffer with room for ``reserve`` more positions; it grows (one copy) only when full."""

    def __init__(self, reserve: int):
        super().__init__()
        self.reserve = reserve
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, held: int) -> "ReservedLayer":
        """A layer over the room ``keys``/``values`` ``[batch, kv_heads, n, head_dim]`` whose first
        ``held`` positions are filled; new positions are written after them."""
        layer = cls(0)
        layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        layer._room = (keys, values)
        layer.keys, layer.values = keys[..., :held, :], values[..., :held, :]
        return layer

    @property
    def room(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers behind :attr:`keys` and :attr:`values` (None before the first write)."""
        return self._room

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write ``key_states``/``value_states`` ``[batch, kv_heads, new, head_dim]`` after the held
        positions; return the views of every held position."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        total = held + key_states.shape[-2]
        if not self._fits(key_states, held, total):
            self._grow(key_states, held, total)
        keys, values = self._room
        keys[..., held:total, :] = key_states
        values[..., held:total, :] = value_states
        self.keys, self.values = keys[..., :total, :], values[..., :total, :]
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, held: int, total: int) -> bool:
        """Whether the room takes ``total`` positions of this shape and still backs the held ones
        (a crop keeps the views; a batch reorder replaces them)."""
        if self._room is None:
            return False
        room = self._room[0]
        return (room.shape[:2] == key_states.shape[:2] and room.shape[-1] == key_states.shape[-1]
                and room.dtype == key_states.dtype and room.shape[-2] >= total
                and (held == 0 or self.keys.data_ptr() == room.data_ptr()))

    def _grow(self, key_states: torch.Tensor, held: int, total: int) -> None:
        """A new room for ``total + reserve`` positions holding the ``held`` ones."""
        batch, heads, _, width = key_states.shape
        room = tuple(key_states.new_empty(batch, heads, total + self.reserve, width) for _ in range(2))
        if held:
            room[0][..., :held, :] = self.keys
            room[1][..., :held, :] = self.values
        self._room = room


def reserved_cache(model, reserve: int) -> DynamicCache:
    """The cache ``model`` would build for itself, its full-attention layers :class:`ReservedLayer`
    with room for ``reserve`` positions beyond what they are first given."""
    cache = DynamicCache(config=model.config)
    cache.layers = [ReservedLayer(reserve) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cropped_cache(cache: DynamicCache, n: int) -> DynamicCache:
    """A cache holding the first ``n`` positions of ``cache``, whose layers must all hold the whole
    sequence (:func:`full_attention_only`): views, so ``cache`` itself is neither copied nor changed
    (continuing the crop concatenates new tensors)."""
    cropped = DynamicCache()
    cropped.layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(f"only full-attention cache layers can be cropped, not {type(layer).__name__}")
        if not 0 < n <= layer.get_seq_length():
            raise ValueError(f"a crop holds 1 to {layer.get_seq_length()} positions, not {n}")
        view = DynamicLayer()
        view.dtype, view.device, view.is_initialized = layer.dtype, layer.device, True
        view.keys, view.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        cropped.layers.append(view)
    return cropped


def full_attention_only(model) -> bool:
    """Whether every layer of ``model``'s cache holds the whole sequence's keys and values (no
    sliding-window layers, no layers converted to linear attention, which keep a state instead)."""
    from .conversion.converted import converted_layers

    kinds = DynamicCache(config=model.config).layers
    return all(type(layer) is DynamicLayer for layer in kinds) and not converted_layers(model)


class SharedRooms:
    """One buffer per full-attention layer holding the keys and values of ``batch`` sequences, with
    room for ``positions`` each (``[batch, kv_heads, positions, head_dim]``, allocated at the first
    write, zero where nothing was written). Each sequence is prefilled alone through its
    :meth:`row_cache`, which writes straight into its row; then all decode together through
    :meth:`batch_cache`, whose calls need a mask hiding each row's unfilled positions."""

    def __init__(self, model, batch: int, positions: int):
        self.config, self.batch, self.positions = model.config, batch, positions
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full_layers = full_attention_layers(model.config)
        if batch > 1 and not full_attention_only(model):
            raise ValueError("sequences decode side by side only on full-attention caches (this model has "
                             "sliding-window or converted layers)")

    def row_cache(self, row: int, prefix: DynamicCache | None = None) -> DynamicCache:
        """The cache of sequence ``row``: its full-attention layers write into the row's room, starting
        from ``prefix``'s positions (copied at the first write); other layers (a window, a converted
        layer's state) are copies of ``prefix``'s."""
        cache = DynamicCache(config=self.config)
        for index in range(len(cache.layers)):
            start = None if prefix is None else prefix.layers[index]
            if index in self.full_layers and (start is None or isinstance(start, DynamicLayer)):
                cache.layers[index] = _RowLayer(self, index, row, start)
            elif start is not None:
                cache.layers[index] = copy.deepcopy(start)
        return cache

    def batch_cache(self, held: int) -> DynamicCache:
        """A cache of every row holding their first ``held`` positions (reserved room after them)."""
        cache = DynamicCache(config=self.config)
        for index in self.full_layers:
            cache.layers[index] = ReservedLayer.holding(*self.buffers[index], held)
        return cache

    def views(self, layer: int, row: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``row`` of ``layer``'s keys and values buffers (allocated like ``like [1, kv, n, D]``)."""
        if layer not in self.buffers:
            self.buffers[layer] = tuple(like.new_zeros(self.batch, like.shape[1], self.positions, like.shape[-1])
                                        for _ in range(2))
        keys, values = self.buffers[layer]
        return keys[row:row + 1], values[row:row + 1]


class _RowLayer(ReservedLayer):
    """A full-attention layer of one row of :class:`SharedRooms`, holding ``start``'s positions first."""

    def __init__(self, rooms: SharedRooms, index: int, row: int, start: DynamicLayer | None):
        super().__init__(0)
        self.rooms, self.index, self.row = rooms, index, row
        if start is not None and start.is_initialized:
            self.dtype, self.device, self.is_initialized = start.dtype, start.device, True
            self.keys, self.values = start.keys, start.values

    def _grow(self, key_states: torch.Tensor, held: int, total: int) -> None:
        if self._room is not None or total > self.rooms.positions:
            raise ValueError(f"a row of shared rooms holds {self.rooms.positions} positions, not {total}")
        room = self.rooms.views(self.index, self.row, key_states)
        if held:
            room[0][..., :held, :] = self.keys
            room[1][..., :held, :] = self.values
        self._room = room


def cache_bytes(cache) -> int:
    """Bytes a transformers cache holds between calls: keys and values, what a streaming layer keeps,
    and the window and state of layers converted to linear attention (layers that count themselves
    through ``stored_bytes``)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "stored_bytes"):  # a StreamingLayer, a converted layer's RecurrentState
            total += layer.stored_bytes()
        elif getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


__all__ = ["ReservedLayer", "SharedRooms", "cache_bytes", "cropped_cache", "full_attention_only", "reserved_cache"]
