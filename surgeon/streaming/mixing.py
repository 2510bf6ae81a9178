"""DuoAttention's gate mixing: each KV head's output is ``α·full + (1 − α)·streaming``, where the
streaming attention sees only the sequence's first ``sinks`` valid tokens and the ``window`` latest
positions (as :class:`~headlab.surgeon.Stream`). ``α`` ``[n_layers, n_kv_heads]`` may require grad: the
gate training optimises it. Both attentions are the model's own implementation (soft-caps and learned
sinks included), the streaming one under a narrowed mask. Whole sequences only (training), no cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...core.errors import PlanError
from .. import attention_math
from ..edits import formulas as edits


@dataclass
class StreamMix:
    """Gates ``alphas [n_layers, n_kv_heads]`` on the global ``layers``; every query head follows its KV head."""

    alphas: torch.Tensor
    layers: tuple[int, ...]
    sinks: int
    window: int

    def mix(self, layer: int, own: Callable, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, kwargs: dict, out: torch.Tensor, key_valid: torch.Tensor,
            group_size: int) -> torch.Tensor:
        """``out [B, N, H, D]`` (the full attention) mixed with the streaming attention by the layer's gates."""
        n_query, n_key = query.shape[-2], key.shape[-2]
        if n_query != n_key:
            raise PlanError("gate mixing runs on whole sequences (training), not on cached decoding")
        if kwargs.get("sliding_window") is not None:
            raise PlanError(f"layer {layer} slides over a window already; gates mix global layers only")
        positions = torch.arange(n_key, device=query.device)
        sink = key_valid & (key_valid.cumsum(-1) <= self.sinks)  # [B, N]
        keep = edits.streaming_keep(sink, positions, positions, self.window)  # [B, N, N], as Stream keeps
        narrowed = attention_math.narrowed_mask(attention_mask, keep[:, None], n_query, n_key, True)
        streaming, _ = own(module, query, key, value, narrowed, **kwargs)
        alpha = self.alphas[layer].repeat_interleave(group_size).to(out.dtype)[None, None, :, None]  # [1, 1, H, 1]
        return alpha * out + (1 - alpha) * streaming


__all__ = ["StreamMix"]
