"""Naive references that materialize the attention map: the specification of every kernel.

Shapes: ``q [B, Hq, Nq, D]``; ``k, v [B, Hkv, Nk, D]`` with query head ``h`` reading KV head
``h // (Hq // Hkv)``. Row ``i`` sits at key position ``i + q_offset`` (default ``Nk - Nq``), so a
causal row sees keys ``j <= i + q_offset``. ``key_valid [B, Nk]`` (bool) removes padded keys;
``key_groups [B, G, Nk]`` (bool) are column sets whose mass is reported per row.

A row with no visible key has ``out = 0``, ``lse = -inf``, ``entropy = 0``, group mass 0 and
top-k indices -1 with weight 0. For tests only: memory is ``B·Hq·Nq·Nk`` floats.

The family quirks of :mod:`.quirks` are written out literally here: ``window`` limits a causal
row to its last ``window`` keys, ``softcap`` maps logits to ``c·tanh(s/c)``, and ``sinks [Hq]``
is a real extra column of the softmax that is dropped afterwards (a row that sees no key then
puts all its mass on the sink: ``lse = sink``, ``entropy = 0``, ``out = 0``).
"""

from __future__ import annotations

import torch

from .types import AttentionStats, ColumnStats


def visibility(
    batch: int, n_query: int, n_key: int, causal: bool, q_offset: int, key_valid: torch.Tensor | None, device,
    window: int | None = None,
) -> torch.Tensor:
    """``[B, 1, Nq, Nk]`` bool: which keys each row sees."""
    visible = torch.ones(batch, 1, n_query, n_key, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(n_query, device=device)[:, None] + q_offset
        keys = torch.arange(n_key, device=device)[None, :]
        visible = visible & (keys <= rows)
        if window is not None:
            visible = visible & (keys > rows - window)
    if key_valid is not None:
        visible = visible & key_valid[:, None, None, :].bool()
    return visible


def attention_probs_reference(q, k, scale, causal, q_offset=None, key_valid=None, window=None, softcap=None,
                              sinks=None):
    """``(p, s, visible)``: fp32 probabilities, logits (soft-capped) and visibility, all
    ``[B, Hq, Nq, Nk]``; with ``sinks`` the rows of ``p`` sum to ``1 - p_sink``."""
    batch, n_heads, n_query, _ = q.shape
    n_key = k.shape[-2]
    group = n_heads // k.shape[1]
    q_offset = n_key - n_query if q_offset is None else q_offset
    kx = k.float().repeat_interleave(group, dim=1)
    s = torch.matmul(q.float(), kx.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    visible = visibility(batch, n_query, n_key, causal, q_offset, key_valid, q.device, window).expand_as(s)
    masked = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        masked = torch.cat([masked, sinks.float()[None, :, None, None].expand(batch, n_heads, n_query, 1)], -1)
    lse = torch.logsumexp(masked, dim=-1, keepdim=True)
    p = torch.exp(masked - lse)[..., :n_key]
    p = torch.where(visible, p, torch.zeros_like(s))
    return p, s, visible


def attention_stats_reference(
    q, k, v, *, scale=None, causal=True, q_offset=None, key_valid=None, key_groups=None, topk=0, window=None,
    softcap=None, sinks=None,
) -> AttentionStats:
    """Output, log-sum-exp, entropy, group mass and top-k keys of every row, from the full map."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p, s, visible = attention_probs_reference(q, k, scale, causal, q_offset, key_valid, window, softcap, sinks)
    group = q.shape[1] // k.shape[1]
    out = torch.matmul(p, v.float().repeat_interleave(group, dim=1)).to(q.dtype)
    masked = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        masked = torch.cat([masked, sinks.float()[None, :, None, None].expand(*s.shape[:3], 1)], -1)
    lse = torch.logsumexp(masked, dim=-1)
    full_p = torch.exp(masked - lse[..., None])
    entropy = torch.where(full_p > 0, -full_p * (masked - lse[..., None]), torch.zeros_like(full_p)).sum(-1)
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
    q, k, *, scale=None, causal=True, q_offset=None, key_valid=None, query_valid=None, window=None, softcap=None,
    sinks=None,
) -> ColumnStats:
    """Attention each key receives, summed over valid rows, and how many valid rows see it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p, _, visible = attention_probs_reference(q, k, scale, causal, q_offset, key_valid, window, softcap, sinks)
    rows = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    if query_valid is not None:
        rows = query_valid.bool()
    rows = rows[:, None, :, None]
    col_sum = torch.where(rows, p, torch.zeros_like(p)).sum(2)
    col_count = (visible[:, 0] & rows[:, 0]).sum(1)
    return ColumnStats(col_sum, col_count)


# Linear and hybrid attention (docs/methods/conversion.md). Shapes: feature-mapped ``fq, fk [B, H, T, K]``,
# ``q, k [B, H, T, D]``, ``v [B, H, T, V]``; heads are already GQA-expanded. The state of a prefix is
# ``[B, H, K, V + 1]``: ``Σ φk [v, 1]`` (the last column is the normaliser ``z``).


def window_mask_reference(n_tokens: int, window: int, terrace: bool, device=None) -> torch.Tensor:
    """``[T, T]`` bool: the keys each query attends with softmax. Terrace: its own ``window``-block
    up to itself plus the whole previous block; sliding: the last ``window`` keys up to itself."""
    rows = torch.arange(n_tokens, device=device)[:, None]
    cols = torch.arange(n_tokens, device=device)[None, :]
    start = (rows // window) * window - window if terrace else rows - window + 1
    return (cols <= rows) & (cols >= start)


def linear_attention_reference(fq, fk, v, *, normalize: bool = True, initial_state=None):
    """``(o [B, H, T, V], state [B, H, K, V + 1])`` of causal linear attention, from the full
    ``T × T`` map: ``o_n = Σ_{j≤n} (φq_n·φk_j) v_j``, divided by ``Σ_{j≤n} φq_n·φk_j`` (plus the
    initial state's share) when ``normalize``."""
    n_tokens = fq.shape[2]
    v1 = torch.cat([v.double(), torch.ones_like(v[..., :1]).double()], -1)
    causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=fq.device).tril()
    a = (fq.double() @ fk.double().transpose(-1, -2)) * causal
    out = a @ v1
    state = fk.double().transpose(-1, -2) @ v1
    if initial_state is not None:
        out = out + fq.double() @ initial_state.double()
        state = state + initial_state.double()
    o = out[..., :-1] / out[..., -1:] if normalize else out[..., :-1]
    return o.to(v.dtype), state.float()


def hybrid_attention_reference(q, k, v, fq, fk, gamma, *, window: int = 64, terrace: bool = True, scale=None):
    """``o [B, H, T, V]`` of the LoLCATs hybrid layer from the full map: softmax over the window
    ``W_n`` with the exact window maximum ``c_n``, weighted by ``gamma [H]``, plus linear attention
    over the older keys, under one normaliser:
    ``o_n = (γ Σ_{W_n} e^{s−c_n} v + Σ_{j<W_n} (φq_n·φk_j) v) / (γ Σ_{W_n} e^{s−c_n} + Σ_{j<W_n} φq_n·φk_j)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_tokens = q.shape[2]
    in_window = window_mask_reference(n_tokens, window, terrace, q.device)
    older = torch.ones_like(in_window).tril() & ~in_window
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~in_window, float("-inf"))
    c = s.amax(-1, keepdim=True)
    soft = torch.exp(s - c) * gamma.double()[None, :, None, None]
    lin = (fq.double() @ fk.double().transpose(-1, -2)) * older
    v1 = torch.cat([v.double(), torch.ones_like(v[..., :1]).double()], -1)
    out = (soft + lin) @ v1
    return (out[..., :-1] / out[..., -1:]).to(v.dtype)


# Attention over a few key columns, from the rows' known log-sum-exp (:mod:`.columns`).


def partial_attention_reference(q, k, v, lse, key_index, *, scale=None, causal=True, q_offset=None, window=None,
                                softcap=None):
    """``(mass [B, Hq, Nq], out [B, Hq, Nq, D])`` over the keys ``key_index [B, S]`` (-1: unused), from
    the full map ``exp(s - lse)`` of the visible keys (a row with ``lse = -inf`` gets zeros)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    _, s, visible = attention_probs_reference(q.to(work), k.to(work), scale, causal, q_offset, None, window, softcap)
    finite = torch.isfinite(lse)[..., None]
    p = torch.where(visible & finite, torch.exp(s - lse.to(work).masked_fill(~finite[..., 0], 0.0)[..., None]),
                    torch.zeros_like(s))
    chosen = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    for row, keys in enumerate(key_index.tolist()):
        chosen[row, [j for j in keys if j >= 0]] = True
    p = p * chosen[:, None, None, :]
    group = q.shape[1] // k.shape[1]
    return p.sum(-1), torch.matmul(p, v.to(work).repeat_interleave(group, dim=1))


def row_key_probs_reference(q, k, lse, offsets, *, scale=None, q_offset=None, key_valid=None, window=None,
                            softcap=None):
    """``[B, Hq, Nq, len(offsets)]``: entry ``[..., i, slot]`` is the weight ``exp(s - lse)`` row ``i``
    gives key ``i + q_offset - offsets[slot]``, read off the full map (0 where that key does not exist,
    is padded or lies outside the window, or the row sees nothing)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    n_query, n_key = q.shape[2], k.shape[2]
    q_offset = n_key - n_query if q_offset is None else q_offset
    _, s, visible = attention_probs_reference(q.to(work), k.to(work), scale, True, q_offset, key_valid, window, softcap)
    finite = torch.isfinite(lse)[..., None]
    p = torch.where(visible & finite, torch.exp(s - lse.to(work).masked_fill(~finite[..., 0], 0.0)[..., None]),
                    torch.zeros_like(s))
    out = torch.zeros(*q.shape[:3], len(offsets), dtype=work, device=q.device)
    for slot, d in enumerate(offsets):
        for i in range(n_query):
            key = i + q_offset - d
            if 0 <= key < n_key:
                out[:, :, i, slot] = p[:, :, i, key]
    return out


# The TopK sparse autoencoder (:mod:`.sae_codes`). Shapes: ``x [B, d]``, ``W_enc [d, n]``, ``b_enc [n]``,
# ``b_dec [d]``, ``W_dec [n, d]``; a code is ``(values [B, k], indices [B, k])``.


def topk_encode_reference(x, w_enc, b_enc, b_dec, k: int):
    """``(values, indices)``: the ``k`` largest of ``ReLU((x - b_dec) W_enc + b_enc)`` per row, from the
    dense pre-activations."""
    pre = torch.relu((x - b_dec) @ w_enc + b_enc)
    values, indices = pre.topk(k, dim=-1)
    return values, indices


def sparse_decode_reference(values, indices, w_dec, b_dec):
    """``x̂ = codes @ W_dec + b_dec`` with the dense ``[B, n]`` code of ``(values, indices)``."""
    codes = torch.zeros(values.shape[0], w_dec.shape[0], dtype=values.dtype, device=values.device)
    return codes.scatter(1, indices, values) @ w_dec + b_dec
