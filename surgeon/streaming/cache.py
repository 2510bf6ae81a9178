"""The streaming cache: for the KV heads a plan streams (:class:`~headlab.surgeon.Stream`), only the
entries those heads can still see, the sink tokens and the latest window (:class:`StreamingLayer`).
Each call still receives keys for every position (the dropped ones as zeros, which the plan hides), so
attention is unchanged and only what is stored between calls shrinks."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...core.shape import model_shape
from ..edits.stream import Stream


class StreamingLayer(DynamicLayer):
    """A full-attention cache layer whose ``streaming`` KV heads keep only their first ``keep_first``
    positions and their latest ``window``; the other KV heads keep every position. ``update`` returns
    ``[batch, kv_heads, positions, head_dim]`` keys and values with zeros where a streaming head's
    entry was dropped (the :class:`~headlab.surgeon.Stream` edit hides those keys from it).

    With ``compensate``, the layer also keeps the sum of the dropped keys and values and returns it
    at the first dropped position: the sum over a row's hidden keys, which the compensation token
    averages, is then the same as over the full keys (up to rounding), with one stored position."""

    def __init__(self, streaming: list[int], keep_first: int, window: int, compensate: bool = False):
        super().__init__()
        self.streaming, self.keep_first, self.window = sorted(streaming), keep_first, window
        self.compensate = compensate
        self.length = 0
        self.full: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, kv_full, length, D]
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, kv_stream, <= keep_first, D]
        self.recent: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, kv_stream, <= window, D]
        self.dropped: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, kv_stream, 1, D] sums, when compensating

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        n_kv = key_states.shape[1]
        if self.streaming and not 0 <= self.streaming[0] <= self.streaming[-1] < n_kv:
            raise ValueError(f"streaming KV heads {self.streaming} outside the layer's {n_kv}")
        self.full_heads = [h for h in range(n_kv) if h not in self.streaming]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Keys and values of every position so far (dropped entries zero); store the new ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        states = (key_states, value_states)
        every = states if self.length == 0 else tuple(torch.cat([self._expanded(i), new], dim=-2)
                                                      for i, new in enumerate(states))
        self.length += key_states.shape[-2]
        self._store(every)
        return every

    def _expanded(self, i: int) -> torch.Tensor:
        """Stored keys (``i`` 0) or values (1) of every position so far, zeros where dropped."""
        full = self.full[i]
        out = full.new_zeros(full.shape[0], len(self.full_heads) + len(self.streaming), self.length, full.shape[-1])
        out[:, self.full_heads] = full
        first, recent = self.first[i], self.recent[i]
        stream = out[:, self.streaming]
        stream[..., :first.shape[-2], :] = first
        stream[..., self.length - recent.shape[-2]:, :] = recent
        if self.dropped is not None:
            stream[..., self.keep_first:self.keep_first + 1, :] = self.dropped[i]
        out[:, self.streaming] = stream
        return out

    def _store(self, every: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep every position of the full heads, the first and latest of the streaming ones."""
        self.full = tuple(t[:, self.full_heads] for t in every)
        stream = tuple(t[:, self.streaming] for t in every)
        self.first = tuple(t[..., :self.keep_first, :].clone() for t in stream)
        start = max(self.keep_first, self.length - self.window)
        self.recent = tuple(t[..., start:, :].clone() for t in stream)
        if self.compensate and start > self.keep_first:  # the slot already holds the earlier drops' sum
            self.dropped = tuple(t[..., self.keep_first:start, :].sum(-2, keepdim=True, dtype=torch.float32).to(t.dtype)
                                 for t in stream)

    def get_seq_length(self) -> int:
        return self.length

    def stored_bytes(self) -> int:
        """Bytes this layer holds between calls."""
        if not self.is_initialized or self.full is None:
            return 0
        parts = (self.full, self.first, self.recent) + ((self.dropped,) if self.dropped is not None else ())
        return sum(t.numel() * t.element_size() for part in parts for t in part)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a streaming cache cannot be cropped (the dropped entries are gone)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a streaming cache does not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a streaming cache does not support beam search")


def streaming_cache(model, plan, attention_mask: torch.Tensor | None = None) -> DynamicCache:
    """The cache ``model`` would build, with :class:`StreamingLayer` on the full-attention layers where
    ``plan`` streams whole KV heads. ``attention_mask [B, N]`` (left padding) moves each row's sink
    tokens; the layer keeps the positions up to the latest row's last sink."""
    shape = model_shape(model)
    pads = 0 if attention_mask is None else int((attention_mask == 0).long().cumprod(-1).sum(-1).max())
    cache = DynamicCache(config=model.config)
    by_layer: dict[int, list] = {}
    for edit in plan.edits:
        if isinstance(edit, Stream) and type(cache.layers[edit.layer]) is DynamicLayer:
            by_layer.setdefault(edit.layer, []).append(edit)
    for layer, edits in by_layer.items():  # several edits on a layer: keep what the widest needs
        kv_heads = sorted({h // shape.group_size for edit in edits for h in edit.heads})
        keep_first = pads + max(edit.sinks for edit in edits)
        cache.layers[layer] = StreamingLayer(kv_heads, keep_first, max(edit.window for edit in edits),
                                             any(edit.compensate for edit in edits))
    return cache


__all__ = ["StreamingLayer", "streaming_cache"]
