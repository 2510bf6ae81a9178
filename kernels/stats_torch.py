"""Attention statistics in plain torch, chunked over query blocks: memory O(B·Hq·block·Nk).

The CPU path. Same semantics as :mod:`headlab.kernels.reference` (see its docstring for shapes,
masks and the empty-row convention).
"""

from __future__ import annotations

import torch

from .reference import visibility
from .types import AttentionStats, ColumnStats

DEFAULT_BLOCK = 128


def _block_logits(q, kf, scale, start, stop):
    """fp32 logits ``[B, Hq, blk, Nk]`` of query rows ``start:stop``, GQA without expanding K."""
    batch, n_heads, _, dim = q.shape
    n_kv = kf.shape[1]
    group = n_heads // n_kv
    blk = stop - start
    qb = q[:, :, start:stop].float().reshape(batch, n_kv, group * blk, dim)
    return (torch.matmul(qb, kf.transpose(-1, -2)) * scale).reshape(batch, n_heads, blk, -1)


def _gqa_matmul(p, vf):
    """``p [B, Hq, blk, Nk] @ v [B, Hkv, Nk, D]`` -> ``[B, Hq, blk, D]`` without expanding V."""
    batch, n_heads, blk, n_key = p.shape
    n_kv = vf.shape[1]
    out = torch.matmul(p.reshape(batch, n_kv, (n_heads // n_kv) * blk, n_key), vf)
    return out.reshape(batch, n_heads, blk, -1)


def attention_stats_torch(
    q, k, v, *, scale, causal, q_offset, key_valid=None, key_groups=None, topk=0, block=DEFAULT_BLOCK
) -> AttentionStats:
    """Output and per-row statistics, one query block at a time."""
    batch, n_heads, n_query, _ = q.shape
    n_key = k.shape[-2]
    kf, vf = k.float(), v.float()
    groups = None if key_groups is None else key_groups.float()
    out = torch.empty(batch, n_heads, n_query, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, n_heads, n_query, device=q.device)
    entropy = torch.empty_like(lse)
    mass = None if groups is None else torch.empty(batch, n_heads, n_query, groups.shape[1], device=q.device)
    idx = None if not topk else torch.empty(batch, n_heads, n_query, topk, dtype=torch.long, device=q.device)
    weights = None if not topk else torch.empty(batch, n_heads, n_query, topk, device=q.device)
    for start in range(0, n_query, block):
        stop = min(start + block, n_query)
        s = _block_logits(q, kf, scale, start, stop)
        visible = visibility(batch, stop - start, n_key, causal, q_offset + start, key_valid, q.device)
        masked = s.masked_fill(~visible, float("-inf"))
        row_max = masked.amax(-1, keepdim=True)
        empty = torch.isinf(row_max)
        e = torch.exp(masked - torch.where(empty, torch.zeros_like(row_max), row_max))
        total = e.sum(-1, keepdim=True)
        p = e / torch.where(empty, torch.ones_like(total), total)
        block_lse = torch.where(empty, row_max, row_max + total.log()).squeeze(-1)
        lse[:, :, start:stop] = block_lse
        out[:, :, start:stop] = _gqa_matmul(p, vf).to(q.dtype)
        weighted = (p * s.masked_fill(~visible, 0.0)).sum(-1)
        entropy[:, :, start:stop] = torch.where(empty.squeeze(-1), torch.zeros_like(weighted), block_lse - weighted)
        if mass is not None:
            mass[:, :, start:stop] = torch.einsum("bhqk,bgk->bhqg", p, groups)
        if topk:
            top = torch.topk(p.masked_fill(~visible, -1.0), min(topk, n_key), dim=-1)
            hidden = top.values < 0
            idx[:, :, start:stop, : top.indices.shape[-1]] = top.indices.masked_fill(hidden, -1)
            weights[:, :, start:stop, : top.values.shape[-1]] = top.values.masked_fill(hidden, 0.0)
            idx[:, :, start:stop, top.indices.shape[-1] :] = -1
            weights[:, :, start:stop, top.values.shape[-1] :] = 0.0
    return AttentionStats(out, lse, entropy, mass, idx, weights)


def visible_row_counts(batch, n_query, n_key, causal, q_offset, key_valid, query_valid, device) -> torch.Tensor:
    """``[B, Nk]`` int64: how many valid rows see each key (O(B·(Nq+Nk)), no map)."""
    rows = torch.ones(batch, n_query, dtype=torch.long, device=device)
    if query_valid is not None:
        rows = query_valid.long().to(device)
    if causal:
        # key j is seen by rows i with i + q_offset >= j: a suffix sum of valid rows
        suffix = torch.cat([rows.flip(-1).cumsum(-1).flip(-1), torch.zeros(batch, 1, dtype=torch.long, device=device)], -1)
        first_row = (torch.arange(n_key, device=device) - q_offset).clamp(0, n_query)
        counts = suffix[:, first_row]
    else:
        counts = rows.sum(-1, keepdim=True).expand(batch, n_key)
    if key_valid is not None:
        counts = counts * key_valid.long().to(device)
    return counts.contiguous()


def column_stats_torch(
    q, k, lse, *, scale, causal, q_offset, key_valid=None, query_valid=None, block=DEFAULT_BLOCK
) -> ColumnStats:
    """Column sums of ``p = exp(s - lse)`` over valid rows and visible-row counts per key."""
    batch, n_heads, n_query, _ = q.shape
    n_key = k.shape[-2]
    kf = k.float()
    col_sum = torch.zeros(batch, n_heads, n_key, device=q.device)
    for start in range(0, n_query, block):
        stop = min(start + block, n_query)
        s = _block_logits(q, kf, scale, start, stop)
        visible = visibility(batch, stop - start, n_key, causal, q_offset + start, key_valid, q.device)
        if query_valid is not None:
            visible = visible & query_valid[:, None, start:stop, None].bool()
        p = torch.exp(s - lse[:, :, start:stop, None]).masked_fill(~visible, 0.0)
        col_sum += p.sum(2)
    counts = visible_row_counts(batch, n_query, n_key, causal, q_offset, key_valid, query_valid, q.device)
    return ColumnStats(col_sum, counts)
