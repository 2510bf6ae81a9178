"""The torch path of attention restricted to a few key columns (:mod:`.columns`): gathers the
columns and computes their weights from the rows' known log-sum-exp, in fp32 (fp64 for fp64 inputs).
Shapes as in :mod:`.columns`."""

from __future__ import annotations

import torch

from .quirks import softcapped


def partial_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    key_index: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    q_offset: int,
    window: int | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.columns.partial_attention` on checked arguments (``scale`` and ``q_offset`` given)."""
    batch, n_heads, n_query, dim = q.shape
    n_kv = k.shape[1]
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


def row_key_probs_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    offsets: tuple[int, ...],
    *,
    scale: float,
    q_offset: int,
    key_valid: torch.Tensor | None,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """:func:`.columns.row_key_probs` on checked arguments (``scale`` and ``q_offset`` given)."""
    batch, n_heads, n_query, dim = q.shape
    n_kv, n_key = k.shape[1], k.shape[2]
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


__all__ = ["partial_attention_torch", "row_key_probs_torch"]
