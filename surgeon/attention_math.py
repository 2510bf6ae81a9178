"""Pure tensor functions the attention hook composes (no model state).

Shapes: ``q [batch, heads, query, head_dim]`` after RoPE; ``k, v [batch, kv_heads, key, head_dim]``
after the cache update, not expanded for GQA; masks additive ``[batch, 1, query, key]``;
attention ``[batch, heads, query, key]``; per-head outputs ``[batch, seq, heads, head_dim]``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from ..kernels.reference import visibility

_warned_none_mask = False
MASKED = torch.finfo(torch.float32).min  # as eager: fully hidden rows become uniform, not NaN


def kv_heads_for(heads: Sequence[int], group_size: int) -> list[int]:
    """KV head read by each query head: ``h // g`` (the layout ``repeat_kv`` produces)."""
    return [h // group_size for h in heads]


def additive_mask(mask: torch.Tensor | None, n_query: int, n_key: int, is_causal: bool, device) -> torch.Tensor:
    """An fp32 additive mask ``[batch or 1, 1, query, key]`` (0 visible, fp32 min hidden).

    ``None`` is treated as causal with offset ``key - query`` when ``is_causal`` (with a one-time
    warning), else as all-visible. Boolean masks mark visible entries with True.
    """
    if mask is None:
        _warn_none_mask_once()
        if not is_causal:
            return torch.zeros(1, 1, n_query, n_key, device=device)
        offset = n_key - n_query
        rows = torch.arange(n_query, device=device)[:, None] + offset
        visible = torch.arange(n_key, device=device)[None, :] <= rows
        return torch.zeros(1, 1, n_query, n_key, device=device).masked_fill(~visible, MASKED)
    mask = mask[..., :n_key]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, MASKED)
    return mask.float()


def _warn_none_mask_once() -> None:
    global _warned_none_mask
    if not _warned_none_mask:
        warnings.warn("attention mask arrived as None; treating it as causal (or full for encoders)")
        _warned_none_mask = True


def attention_logits(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    heads: Sequence[int],
    group_size: int,
    is_causal: bool,
) -> torch.Tensor:
    """Masked fp32 logits ``[batch, len(heads), query, key]`` of the chosen query heads."""
    q = query[:, list(heads)].float()
    k = key[:, kv_heads_for(heads, group_size)].float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    return scores + additive_mask(mask, q.shape[-2], k.shape[-2], is_causal, q.device)


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    heads: Sequence[int],
    group_size: int,
    is_causal: bool,
) -> torch.Tensor:
    """Softmax probabilities ``[batch, len(heads), query, key]`` in fp32; rows sum to one."""
    logits = attention_logits(query, key, mask, scaling, heads, group_size, is_causal)
    return torch.softmax(logits, dim=-1)


class MaskStructureError(ValueError):
    """The mask is not (causal or bidirectional) visibility with key padding."""


_CHECK_ROWS = 1024  # rows per chunk when checking a mask's structure (no second N×N tensor)


def _visible_entries(mask, n_query: int, n_key: int, is_causal: bool, device) -> torch.Tensor:
    """Bool ``[batch or 1, 1, query, key]``: True where a row sees a key. A boolean mask is used
    as it is (no fp32 copy: at 8192 tokens that would be 256 MB)."""
    if mask is not None and mask.dtype == torch.bool:
        return mask[..., :n_key]
    return additive_mask(mask, n_query, n_key, is_causal, device) > MASKED / 2


def decompose_mask(mask, n_query: int, n_key: int, is_causal: bool, device):
    """``(key_valid [B, Nk], query_valid [B, Nq], q_offset)`` of a self-attention mask that is
    causal (offset ``Nk - Nq``) or bidirectional visibility restricted to non-padded keys; a
    padded token is a padded key and a padded query row.

    Raises :class:`MaskStructureError` for anything else (sliding windows, packed sequences),
    checked on the valid rows, so statistics are never computed under the wrong mask.
    """
    q_offset = n_key - n_query
    visible = _visible_entries(mask, n_query, n_key, is_causal, device)[:, 0]  # [B or 1, Nq, Nk]
    key_valid = visible.any(1)
    query_valid = key_valid[:, q_offset:]  # self-attention: row i is the token at key i + q_offset
    for start in range(0, n_query, _CHECK_ROWS):
        stop = min(start + _CHECK_ROWS, n_query)
        expected = visibility(key_valid.shape[0], stop - start, n_key, is_causal, q_offset + start, key_valid,
                              device)[:, 0]
        rows = query_valid[:, start:stop]
        if not torch.equal(visible[:, start:stop][rows], expected[rows]):
            raise MaskStructureError(
                "attention statistics need a causal or bidirectional mask with key padding; this layer's "
                "mask has another structure (sliding window or packed sequences?)"
            )
    return key_valid, query_valid, q_offset


def scale_heads(out: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Multiply per-head outputs ``out [batch, seq, heads, head_dim]`` by ``scales [heads]``."""
    return out * scales.to(out.dtype)[None, None, :, None]
