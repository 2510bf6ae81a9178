"""Naive references that materialize the attention map: the specification of every kernel.

Shapes: ``q [B, Hq, Nq, D]``; ``k, v [B, Hkv, Nk, D]`` with query head ``h`` reading KV head
``h // (Hq // Hkv)``. Row ``i`` sits at key position ``i + q_offset`` (default ``Nk - Nq``), so a
causal row sees keys ``j <= i + q_offset``. ``key_valid [B, Nk]`` (bool) removes padded keys;
``key_groups [B, G, Nk]`` (bool) are column sets whose mass is reported per row.

A row with no visible key has ``out = 0``, ``lse = -inf``, ``entropy = 0``, group mass 0 and
top-k indices -1 with weight 0. For tests only: memory is ``B·Hq·Nq·Nk`` floats.
"""

from __future__ import annotations

import torch

from .types import AttentionStats, ColumnStats


def visibility(
    batch: int, n_query: int, n_key: int, causal: bool, q_offset: int, key_valid: torch.Tensor | None, device
) -> torch.Tensor:
    """``[B, 1, Nq, Nk]`` bool: which keys each row sees."""
    visible = torch.ones(batch, 1, n_query, n_key, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(n_query, device=device)[:, None] + q_offset
        visible = visible & (torch.arange(n_key, device=device)[None, :] <= rows)
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :].bool()
    return visible


def attention_probs_reference(q, k, scale, causal, q_offset=None, key_valid=None):
    """``(p, s, visible)``: fp32 probabilities, logits and visibility, all ``[B, Hq, Nq, Nk]``."""
    batch, n_heads, n_query, _ = q.shape
    n_key = k.shape[-2]
    group = n_heads // k.shape[1]
    q_offset = n_key - n_query if q_offset is None else q_offset
    kx = k.float().repeat_interleave(group, dim=1)
    s = torch.matmul(q.float(), kx.transpose(-1, -2)) * scale
    visible = visibility(batch, n_query, n_key, causal, q_offset, key_valid, q.device).expand_as(s)
    masked = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    p = torch.where(visible, torch.exp(masked - lse), torch.zeros_like(s))
    return p, s, visible


def attention_stats_reference(
    q, k, v, *, scale=None, causal=True, q_offset=None, key_valid=None, key_groups=None, topk=0
) -> AttentionStats:
    """Output, log-sum-exp, entropy, group mass and top-k keys of every row, from the full map."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p, s, visible = attention_probs_reference(q, k, scale, causal, q_offset, key_valid)
    group = q.shape[1] // k.shape[1]
    out = torch.matmul(p, v.float().repeat_interleave(group, dim=1)).to(q.dtype)
    any_visible = visible.any(-1)
    lse = torch.logsumexp(s.masked_fill(~visible, float("-inf")), dim=-1)
    weighted = torch.where(visible, p * s, torch.zeros_like(s)).sum(-1)
    entropy = torch.where(any_visible, lse - weighted, torch.zeros_like(lse))
    mass = None
    if key_groups is not None:
        mass = torch.einsum("bhqk,bgk->bhqg", p, key_groups.float())
    idx = weights = None
    if topk:
        order = torch.sort(p.masked_fill(~visible, -1.0), dim=-1, descending=True, stable=True)
        idx, weights = order.indices[..., :topk], order.values[..., :topk]
        hidden = weights < 0
        idx, weights = idx.masked_fill(hidden, -1), weights.masked_fill(hidden, 0.0)
    return AttentionStats(out, lse, entropy, mass, idx, weights)


def column_stats_reference(
    q, k, *, scale=None, causal=True, q_offset=None, key_valid=None, query_valid=None
) -> ColumnStats:
    """Attention each key receives, summed over valid rows, and how many valid rows see it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p, _, visible = attention_probs_reference(q, k, scale, causal, q_offset, key_valid)
    rows = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    if query_valid is not None:
        rows = query_valid.bool()
    rows = rows[:, None, :, None]
    col_sum = torch.where(rows, p, torch.zeros_like(p)).sum(2)
    col_count = (visible[:, 0] & rows[:, 0]).sum(1)
    return ColumnStats(col_sum, col_count)
