"""Fused Triton kernels: attention forward with statistics (online softmax) and the key-major
column-sum pass. Launchers check shapes and dtypes; semantics are those of :mod:`.reference`.
A sliding window skips the key tiles (forward) and query tiles (column pass) outside every row's
window; soft-capping is applied to each tile's logits; learned sinks are folded into the forward's
results by the launcher (:func:`.quirks.with_sinks`).

Under ``TRITON_INTERPRET=1`` (CPU) tiles are upcast to fp32 before every dot (bf16 dots are wrong
in the interpreter) and outputs are pre-filled with NaN so that an unwritten element shows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .attention_stats_torch import visible_row_counts
from .quirks import with_sinks
from .types import AttentionStats, ColumnStats

BLOCK_M = 64
BLOCK_N = 64
GROUP_PAD = 16  # key groups are padded to a dot-friendly width


@triton.jit
def _tanh(x):
    """tanh from one exponential (no overflow: the argument of exp is never positive)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``scale · q kᵀ`` of a tile, soft-capped to ``c · tanh(s / c)`` when asked."""
    s = tl.dot(q, tl.trans(k)) * scale
    if HAS_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    return s


@triton.jit
def _stats_fwd_kernel(
    Q, K, V, KEY_VALID, GROUPS, OUT, LSE, ENT, MASS, TOPI, TOPW,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    n_heads, n_query, n_key, head_dim, n_groups, q_offset, scale, window, softcap,
    GQA: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, HAS_GROUPS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GPAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_query
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mass = tl.zeros([BLOCK_M, GPAD], tl.float32)
    offs_g = tl.arange(0, GPAD)
    kcol = tl.arange(0, TOPK_PAD)
    top_v = tl.full([BLOCK_M, TOPK_PAD], float("-inf"), tl.float32)
    top_i = tl.full([BLOCK_M, TOPK_PAD], -1, tl.int32)

    lo = 0
    hi = n_key
    if CAUSAL:
        hi = tl.minimum(n_key, (pid_m + 1) * BLOCK_M + q_offset)
    if HAS_WINDOW:  # key tiles before the first row's window are never seen
        lo = tl.maximum(pid_m * BLOCK_M + q_offset - window + 1, 0) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_key
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _scores(q, k, scale, softcap, HAS_SOFTCAP)
        visible = n_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + q_offset)
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > offs_m[:, None] + q_offset - window)
        if HAS_KEY_VALID:
            kvalid = tl.load(KEY_VALID + b * n_key + offs_n, mask=n_ok, other=0)
            visible = visible & (kvalid[None, :] != 0)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        t_i = t_i * alpha + tl.sum(p * tl.where(visible, s, 0.0), 1)
        if UPCAST:
            pv = tl.dot(p, v)
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        if HAS_GROUPS:
            gmask = tl.load(GROUPS + b * n_groups * n_key + offs_g[None, :] * n_key + offs_n[:, None],
                            mask=n_ok[:, None] & (offs_g[None, :] < n_groups), other=0.0)
            mass = mass * alpha[:, None] + tl.dot(p, gmask)
        if TOPK > 0:
            top_v, top_i = _merge_topk(s, offs_n, top_v, top_i, kcol, TOPK, BLOCK_N)
        m_i = m_new

    has_any = l_i > 0.0
    l_safe = tl.where(has_any, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_any, m_i + tl.log(l_safe), float("-inf"))
    entropy = tl.where(has_any, lse - t_i / l_safe, 0.0)
    row_base = pid_bh * n_query + offs_m
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + row_base, lse, mask=row_ok)
    tl.store(ENT + row_base, entropy, mask=row_ok)
    if HAS_GROUPS:
        tl.store(MASS + row_base[:, None] * n_groups + offs_g[None, :], mass / l_safe[:, None],
                 mask=row_ok[:, None] & (offs_g[None, :] < n_groups))
    if TOPK > 0:
        found = top_v != float("-inf")
        weight = tl.where(found, tl.exp(tl.where(found, top_v, 0.0) - tl.where(has_any, lse, 0.0)[:, None]), 0.0)
        index = tl.where(found, top_i, -1)
        top_mask = row_ok[:, None] & (kcol[None, :] < TOPK)
        tl.store(TOPW + row_base[:, None] * TOPK + kcol[None, :], weight, mask=top_mask)
        tl.store(TOPI + row_base[:, None] * TOPK + kcol[None, :], index.to(tl.int64), mask=top_mask)


@triton.jit
def _merge_topk(s, offs_n, top_v, top_i, kcol, TOPK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Merge a tile of logits ``s [M, N]`` into the running top-k (values ``[M, KP]``, key
    indices). Running entries hold earlier keys, so they win ties: the earliest key comes first."""
    new_v = tl.full(top_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(top_i.shape, -1, tl.int32)
    big = 2147483647
    for r in tl.static_range(TOPK):
        tile_max = tl.max(s, 1)
        tile_arg = tl.min(tl.where(s == tile_max[:, None], offs_n[None, :], big), 1)
        run_max = tl.max(top_v, 1)
        run_pos = tl.min(tl.where(top_v == run_max[:, None], kcol[None, :], big), 1)
        run_key = tl.sum(tl.where(kcol[None, :] == run_pos[:, None], top_i, 0), 1)
        take_run = run_max >= tile_max
        value = tl.where(take_run, run_max, tile_max)
        key = tl.where(take_run, run_key, tile_arg)
        new_v = tl.where(kcol[None, :] == r, value[:, None], new_v)
        new_i = tl.where(kcol[None, :] == r, key[:, None], new_i)
        s = tl.where((~take_run)[:, None] & (offs_n[None, :] == tile_arg[:, None]), float("-inf"), s)
        top_v = tl.where(take_run[:, None] & (kcol[None, :] == run_pos[:, None]), float("-inf"), top_v)
    return new_v, new_i


@triton.jit
def _column_kernel(
    Q, K, LSE, KEY_VALID, QUERY_VALID, COL,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    n_heads, n_query, n_key, head_dim, q_offset, scale, window, softcap,
    GQA: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEY_VALID: tl.constexpr, HAS_QUERY_VALID: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // GQA
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n_key
    d_ok = offs_d < head_dim
    k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    key_ok = n_ok
    if HAS_KEY_VALID:
        key_ok = key_ok & (tl.load(KEY_VALID + b * n_key + offs_n, mask=n_ok, other=0) != 0)
    col = tl.zeros([BLOCK_N], tl.float32)
    lo = 0
    hi = n_query
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - q_offset, 0) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:  # rows past the last key's window never see this tile
        hi = tl.minimum(n_query, (pid_n + 1) * BLOCK_N - 1 + window - q_offset)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n_query
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        if HAS_QUERY_VALID:
            row_ok = row_ok & (tl.load(QUERY_VALID + b * n_query + offs_m, mask=row_ok, other=0) != 0)
        lse = tl.load(LSE + pid_bh * n_query + offs_m, mask=row_ok, other=0.0)
        s = _scores(q, k, scale, softcap, HAS_SOFTCAP)
        visible = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + q_offset)
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > offs_m[:, None] + q_offset - window)
        p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
        col += tl.sum(p, 0)
    tl.store(COL + pid_bh * n_key + offs_n, col, mask=n_ok)


def _prepare(q, k, v=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be fp32, fp16 or bf16, got {t.dtype}")
    if v is not None and v.shape[-1] != q.shape[-1]:
        raise ValueError("the Triton kernel needs v's head_dim equal to q's")
    return max(16, triton.next_power_of_2(q.shape[-1]))


def attention_stats_triton(q, k, v, *, scale, causal, q_offset, key_valid=None, key_groups=None, topk=0,
                           window=None, softcap=None, sinks=None) -> AttentionStats:
    """Launch the fused forward; returns the same :class:`AttentionStats` as the references."""
    block_d = _prepare(q, k, v)
    batch, n_heads, n_query, dim = q.shape
    n_key = k.shape[2]
    device = q.device
    out = _launch.output((batch, n_heads, n_query, dim), q.dtype, device)
    lse = _launch.output((batch, n_heads, n_query), torch.float32, device)
    entropy = _launch.output((batch, n_heads, n_query), torch.float32, device)
    n_groups = 0 if key_groups is None else key_groups.shape[1]
    if n_groups > GROUP_PAD:
        raise ValueError(f"at most {GROUP_PAD} key groups per call, got {n_groups}")
    groups = key_groups.to(device=device, dtype=torch.float32).contiguous() if n_groups else lse
    mass = _launch.output((batch, n_heads, n_query, n_groups), torch.float32, device) if n_groups else lse
    top_i = _launch.output((batch, n_heads, n_query, topk), torch.int64, device) if topk else lse
    top_w = _launch.output((batch, n_heads, n_query, topk), torch.float32, device) if topk else lse
    valid = key_valid.to(device=device, dtype=torch.int8).contiguous() if key_valid is not None else lse
    grid = (triton.cdiv(n_query, BLOCK_M), batch * n_heads)
    block_n = BLOCK_N // 2 if q.dtype == torch.float32 and block_d >= 128 else BLOCK_N  # fits sm_90 shared memory
    _stats_fwd_kernel[grid](
        q, k, v, valid, groups, out, lse, entropy, mass, top_i, top_w,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        n_heads, n_query, n_key, dim, n_groups, q_offset, scale, window or 0, softcap or 0.0,
        GQA=n_heads // k.shape[1], CAUSAL=causal, HAS_KEY_VALID=key_valid is not None, HAS_GROUPS=n_groups > 0,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None, TOPK=topk, TOPK_PAD=max(2, triton.next_power_of_2(max(topk, 1))),
        UPCAST=_launch.INTERPRET or q.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_D=block_d, GPAD=GROUP_PAD,
    )
    lse, entropy, keep = with_sinks(lse, entropy, sinks)
    if keep is not None:
        out = (out.float() * keep[..., None]).to(out.dtype)
        mass = mass * keep[..., None] if n_groups else mass
        top_w = top_w * keep[..., None] if topk else top_w
    return AttentionStats(out, lse, entropy, mass if n_groups else None,
                          top_i if topk else None, top_w if topk else None)


def column_stats_triton(q, k, lse, *, scale, causal, q_offset, key_valid=None, query_valid=None, window=None,
                        softcap=None) -> ColumnStats:
    """Launch the key-major column pass; counts of seeing rows come from :func:`visible_row_counts`."""
    block_d = _prepare(q, k)
    batch, n_heads, n_query, dim = q.shape
    n_key = k.shape[2]
    device = q.device
    col = _launch.output((batch, n_heads, n_key), torch.float32, device)
    lse = lse.float().contiguous()
    kv = key_valid.to(device=device, dtype=torch.int8).contiguous() if key_valid is not None else lse
    qv = query_valid.to(device=device, dtype=torch.int8).contiguous() if query_valid is not None else lse
    grid = (triton.cdiv(n_key, BLOCK_N), batch * n_heads)
    _column_kernel[grid](
        q, k, lse, kv, qv, col,
        *q.stride(), *k.stride(),
        n_heads, n_query, n_key, dim, q_offset, scale, window or 0, softcap or 0.0,
        GQA=n_heads // k.shape[1], CAUSAL=causal, HAS_KEY_VALID=key_valid is not None,
        HAS_QUERY_VALID=query_valid is not None, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=_launch.INTERPRET or q.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    return ColumnStats(col, visible_row_counts(batch, n_query, n_key, causal, q_offset, key_valid, query_valid, device,
                                               window))
