"""A KV cache whose heads hold different positions: :class:`CompressedLayer` keeps, per KV head, only
the positions its press chose (variable lengths, so the memory is really freed), and attends over
exactly those; on a sliding-window layer, only those inside the window.

Each call of a compressed layer runs through headlab's attention hook (:func:`~headlab.surgeon.attach`
with ``compression=``): the layer's ``update`` returns every head's held keys and values padded to the
longest head, and :meth:`~.press.KVPress.attend` calls the model's own attention function on them with
a mask that shows each head its own held positions and, causally, the call's new ones (scaling,
soft-caps and learned sinks as the model computes them). The first call of a sequence (the prefill)
attends to everything exactly as the model does; when the press asks, the layer is compressed at the
end of a call (:meth:`~.press.KVPress.compress`). Batches of one sequence only: every head of every
row would choose its own positions.

Shapes: ``key_states [1, kv_heads, new, head_dim]``; a head's store ``keys [held, head_dim]``,
``positions [held]``; queries ``[1, heads, new, head_dim]``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ...core.errors import HeadlabError

PAD_POSITION = 2 ** 62  # the position of a padding slot: after every query, so no query sees it


class HeadStore:
    """The held keys, values and positions of one KV head, in a buffer with room to grow."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        self.keys, self.values, self.positions = keys, values, positions  # [cap, D], [cap, D], [cap]
        self.held = keys.shape[0]

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Add ``keys``/``values [new, D]`` at ``positions [new]`` after the held ones."""
        total = self.held + keys.shape[0]
        if total > self.keys.shape[0]:
            room = total + max(64, total // 2)
            self.keys, self.values, self.positions = (_grown(t, self.held, room) for t in
                                                      (self.keys, self.values, self.positions))
        self.keys[self.held:total] = keys
        self.values[self.held:total] = values
        self.positions[self.held:total] = positions
        self.held = total

    def drop_before(self, position: int) -> None:
        """Forget the entries at positions below ``position`` (a sliding window moved past them)."""
        kept = (self.positions[:self.held] >= position).nonzero()[:, 0]
        if len(kept) < self.held:
            self.keep(kept)

    def keep(self, slots: torch.Tensor) -> None:
        """Hold only the entries at ``slots [k]`` (ascending), in new tensors (the old buffer is freed)."""
        self.keys, self.values, self.positions = (t[slots].clone() for t in (self.keys, self.values, self.positions))
        self.held = len(slots)

    def stored_bytes(self) -> int:
        """Bytes of the held keys and values: the budget's axis, as an uncompressed cache counts. The
        positions beside them (8 bytes per entry, 1.6% more at head size 64 in fp32) are bookkeeping
        the scorers read, not counted."""
        return self.held * 2 * self.keys.shape[-1] * self.keys.element_size()


def _grown(tensor: torch.Tensor, held: int, room: int) -> torch.Tensor:
    out = tensor.new_empty(room, *tensor.shape[1:])
    out[:held] = tensor[:held]
    return out


class Scratch:
    """The buffers a cache's compressed layers hand their padded keys and values in, one call at a time:
    reused from call to call (a decode step allocates nothing), grown when a call needs more."""

    def __init__(self):
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # [1, kv, room, D] each

    def views(self, kv: int, longest: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values views ``[1, kv, longest, D]`` (contents undefined) shaped and typed like ``like``."""
        room = self.buffers
        if (room is None or room[0].shape[1] != kv or room[0].shape[2] < longest or room[0].dtype != like.dtype
                or room[0].device != like.device):
            size = longest + max(64, longest // 4)
            self.buffers = room = tuple(like.new_zeros(1, kv, size, like.shape[-1]) for _ in range(2))
        return room[0][:, :, :longest], room[1][:, :, :longest]


class CompressedLayer(DynamicLayer):
    """A cache layer whose KV heads each hold their own positions (see the module docstring). ``press``
    (a :class:`~.press.KVPress`) chooses what to keep; ``index`` is the layer; ``window``: a sliding-window
    layer's window (a query sees the keys less than ``window`` positions before it; older entries are
    forgotten), None for a global layer."""

    def __init__(self, press, index: int, scratch: "Scratch", window: int | None = None):
        super().__init__()
        self.press, self.index, self.scratch, self.window = press, index, scratch, window
        self.length = 0  # positions of the sequence so far (the model's positions follow it)
        self.heads: list[HeadStore] = []
        self.before: list[int] = []  # each head's held count before the current call
        self.recent_queries: torch.Tensor | None = None  # [1, H, <= observation, D]
        self.recent_positions: torch.Tensor | None = None  # [<= observation]
        self.pending: int | None = None  # compress at the end of the next call, leaving room for this many

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise HeadlabError(f"a compressed cache holds one sequence, not a batch of {key_states.shape[0]}")
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new positions in every head; return the held keys and values of every head,
        ``[1, kv_heads, longest, head_dim]`` (the first call: the new keys as they are)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        positions = torch.arange(self.length, self.length + new, device=key_states.device)
        first = not self.heads
        if first:
            self.heads = [HeadStore(key_states[0, h], value_states[0, h], positions)  # views: compressing copies
                          for h in range(key_states.shape[1])]
            self.before = [0] * len(self.heads)
        else:
            self.forget_outside_window()
            self.before = [head.held for head in self.heads]
            for h, head in enumerate(self.heads):
                head.append(key_states[0, h], value_states[0, h], positions)
        self.length += new
        return (key_states, value_states) if first else self.padded()

    def forget_outside_window(self) -> None:
        """On a sliding-window layer, forget what no query from the next position on can see."""
        if self.window is not None:
            for head in self.heads:
                head.drop_before(self.length - self.window + 1)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's held keys and values, ``[1, kv_heads, longest, head_dim]`` (after a shorter head's
        entries: what an earlier call left, which the mask hides), written into the buffers every layer
        of the cache shares: valid until the next layer's call."""
        longest = max(head.held for head in self.heads)
        keys, values = self.scratch.views(len(self.heads), longest, self.heads[0].keys)
        for h, head in enumerate(self.heads):
            keys[0, h, :head.held] = head.keys[:head.held]
            values[0, h, :head.held] = head.values[:head.held]
        return keys, values

    def visible(self, n_query: int, n_key: int, group: int, device) -> torch.Tensor:
        """``[1, heads, n_query, n_key]`` bool: each query head sees its KV head's held positions from
        before the call and, causally, the call's new ones (new row ``i`` sits at slot ``before + i``)."""
        before = torch.tensor(self.before, device=device).repeat_interleave(group)  # [H]
        slots = torch.arange(n_key, device=device)
        rows = torch.arange(n_query, device=device)
        visible = slots[None, None, :] <= before[:, None, None] + rows[None, :, None]  # [H, n_query, n_key]
        if self.window is not None:  # and within each row's window
            positions = self.held_positions(n_key).to(device).repeat_interleave(group, dim=0)  # [H, n_key]
            row_positions = torch.arange(self.length - n_query, self.length, device=device)
            visible &= positions[:, None, :] > row_positions[None, :, None] - self.window
        return visible[None]

    def observe(self, query: torch.Tensor, keep: int) -> None:
        """Remember the latest ``keep`` query rows ``query [1, H, new, D]`` (the scorers' observation window)."""
        positions = torch.arange(self.length - query.shape[-2], self.length)
        if self.recent_queries is None or query.shape[-2] >= keep:
            self.recent_queries = query[..., -keep:, :].detach().clone()  # not a view: the call's queries go
            self.recent_positions = positions[-keep:]
            return
        self.recent_queries = torch.cat([self.recent_queries, query.detach()], dim=-2)[..., -keep:, :]
        self.recent_positions = torch.cat([self.recent_positions, positions])[-keep:]

    def held_positions(self, longest: int) -> torch.Tensor:
        """``[kv, longest]``: the position of every head's held entries (padding at :data:`PAD_POSITION`)."""
        positions = torch.full((len(self.heads), longest), PAD_POSITION, dtype=torch.long)
        for h, head in enumerate(self.heads):
            positions[h, :head.held] = head.positions[:head.held].cpu()
        return positions

    def held_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keys, values [1, kv, longest, D]`` and ``positions [1, kv, longest]`` of every head
        (padding slots at :data:`PAD_POSITION`)."""
        keys, values = self.padded()
        return keys, values, self.held_positions(keys.shape[-2])[None].to(keys.device)

    def keep_slots(self, slots: list[torch.Tensor]) -> None:
        """Each head keeps the entries at its ``slots [k_h]`` (ascending)."""
        for head, kept in zip(self.heads, slots):
            if len(kept) < head.held:
                head.keep(kept.to(head.keys.device))

    def get_seq_length(self) -> int:
        return self.length

    def stored_bytes(self) -> int:
        """Bytes this layer holds between calls."""
        return sum(head.stored_bytes() for head in self.heads)

    def held_counts(self) -> list[int]:
        """Positions each KV head holds."""
        return [head.held for head in self.heads]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (the dropped entries are gone)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a compressed cache does not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a compressed cache does not support beam search")


def compressed_cache(model, press, layers: list[int]) -> DynamicCache:
    """The cache ``model`` would build, its ``layers`` :class:`CompressedLayer` of ``press`` (a
    sliding-window layer keeping its window)."""
    cache = DynamicCache(config=model.config)
    scratch = Scratch()
    for layer in layers:
        own = cache.layers[layer]
        if type(own) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise HeadlabError(f"layer {layer} keeps a {type(own).__name__}; a press compresses the caches of "
                               "attention layers only")
        cache.layers[layer] = CompressedLayer(press, layer, scratch, getattr(own, "sliding_window", None))
    return cache


__all__ = ["PAD_POSITION", "CompressedLayer", "HeadStore", "Scratch", "compressed_cache"]
