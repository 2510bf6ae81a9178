"""Attention restricted to a few key columns, normalised by a known log-sum-exp.

With the LSE of a fused pass, the mass ``A_G = Σ_{j∈G} a_j`` and partial output
``P_G = Σ_{j∈G} a_j v_j`` of a small key set ``G`` (sinks, a span) cost O(Nq·|G|·D): this is what
the mass-preserving edits need to correct an output without the N×N map (docs/methods/statistics.md).
"""

from __future__ import annotations

import torch

from .scoring import softcapped


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    key_index: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mass [B, Hq, Nq], out [B, Hq, Nq, D])`` over the keys ``key_index [B, S]`` (int64,
    -1 for unused slots; repeated indices count once each, so pass each key once).

    ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]``, ``lse [B, Hq, Nq]`` the rows' natural-log
    normalisers; computed in fp32 (fp64 for fp64 inputs). A row sees key j when ``not causal`` or
    ``j <= i + q_offset`` (default ``Nk - Nq``), and ``j > i + q_offset - window`` with a sliding
    window; ``softcap`` as in :mod:`.scoring`. Rows with ``lse = -inf`` (no visible key) get zeros.
    """
    batch, n_heads, n_query, dim = q.shape
    n_kv, n_key = k.shape[1], k.shape[2]
    if key_index.dim() != 2 or key_index.shape[0] != batch:
        raise ValueError(f"key_index must be [B, S] with B={batch}, got {tuple(key_index.shape)}")
    if (key_index >= n_key).any():
        raise ValueError(f"key_index names keys beyond the {n_key} keys")
    scale = dim**-0.5 if scale is None else scale
    q_offset = n_key - n_query if q_offset is None else q_offset
    work = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    used = key_index >= 0  # [B, S]
    safe = key_index.clamp_min(0)
    gather = safe[:, None, :, None].expand(batch, n_kv, safe.shape[1], dim)
    k_sel = torch.gather(k.to(work), 2, gather).repeat_interleave(n_heads // n_kv, dim=1)  # [B, Hq, S, D]
    v_sel = torch.gather(v.to(work), 2, gather).repeat_interleave(n_heads // n_kv, dim=1)
    s = softcapped(torch.matmul(q.to(work), k_sel.transpose(-1, -2)) * scale, softcap)  # [B, Hq, Nq, S]
    visible = used[:, None, None, :].expand_as(s)
    if causal:
        rows = torch.arange(n_query, device=q.device)[:, None] + q_offset
        visible = visible & (safe[:, None, None, :] <= rows)
        if window is not None:
            visible = visible & (safe[:, None, None, :] > rows - window)
    finite = torch.isfinite(lse)[..., None]
    p = torch.where(visible & finite, torch.exp(s - lse.to(work).masked_fill(~finite[..., 0], 0.0)[..., None]),
                    torch.zeros_like(s))
    return p.sum(-1), torch.matmul(p, v_sel)


def row_key_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    offsets: tuple[int, ...],
    *,
    scale: float | None = None,
    q_offset: int | None = None,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``[B, Hq, Nq, len(offsets)]``: the weight row ``i`` gives key ``i + q_offset - d`` for each
    offset ``d ≥ 0`` (``d = 1``: the previous token), from the rows' LSE in O(Nq·D) per offset;
    0 where that key does not exist, is padded (``key_valid [B, Nk]``) or lies outside a sliding
    ``window`` (``d >= window``), or the row sees nothing. ``softcap`` as in :mod:`.scoring`."""
    batch, n_heads, n_query, dim = q.shape
    n_kv, n_key = k.shape[1], k.shape[2]
    if any(d < 0 for d in offsets):
        raise ValueError(f"offsets must be ≥ 0 (causal rows see no later key), got {offsets}")
    scale = dim**-0.5 if scale is None else scale
    q_offset = n_key - n_query if q_offset is None else q_offset
    work = torch.promote_types(q.dtype, torch.float32)
    kx = k.to(work).repeat_interleave(n_heads // n_kv, dim=1)  # [B, Hq, Nk, D]
    finite = torch.isfinite(lse)
    out = torch.zeros(batch, n_heads, n_query, len(offsets), dtype=work, device=q.device)
    for slot, d in enumerate(offsets):
        keys = torch.arange(n_query, device=q.device) + q_offset - d  # [Nq]
        exists = (keys >= 0) & (keys < n_key) & (window is None or d < window)
        safe = keys.clamp(0, n_key - 1)
        s = softcapped((q.to(work) * kx[:, :, safe]).sum(-1) * scale, softcap)  # [B, Hq, Nq]
        valid = exists[None, None, :] & finite
        if key_valid is not None:
            valid = valid & key_valid[:, safe][:, None, :].bool()
        p = torch.exp(s - lse.to(work).masked_fill(~finite, 0.0))
        out[..., slot] = torch.where(valid, p, torch.zeros_like(p))
    return out
