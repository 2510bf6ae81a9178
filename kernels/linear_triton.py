"""Triton kernels for chunked causal linear attention and the LoLCATs hybrid, forward and backward
(docs/guides/gpu.md). Semantics are those of :mod:`.reference`; launchers and autograd live here too.

Linear attention runs on ``[v, 1]`` so that one kernel yields numerator and normaliser, divided in
torch. It is three passes forward and backward, tiled ``BK × BV`` over the state:
* ``_state_fwd``: walks the chunks in order, storing the state ``h_c`` at each chunk start;
* ``_output_fwd``: per chunk, ``o_c = φq_c h_c + ((φq_c φk_cᵀ) ⊙ M) v_c`` (``INTRA`` off: no second term);
* ``_state_bwd``: walks the chunks in reverse, storing ``g_c = Σ_{c'>c} φq_c'ᵀ do_c'``;
* ``_grad_qk`` and ``_grad_v``: per chunk, the gradients from ``h_c``, ``g_c`` and the intra block.

The hybrid splits into a linear part and a window part. With chunk = window ``C``, the linear part of
query chunk ``c`` reads keys older than chunk ``c − 1``: plain linear attention on keys and values
shifted by one chunk, without the intra block (terrace) or with it (sliding window, whose older keys
in chunk ``c − 1`` are exactly those at offsets ``≤`` the query's). The window part is a two-tile
softmax with the exact window maximum ``m``, computed by ``_window_fwd`` (which also returns ``m`` and
its key) and differentiated at fixed ``m`` by ``_window_bwd_q`` and ``_window_bwd_kv``; the gradient
through ``m`` itself is added in torch by gathering the maximal key.

Under ``TRITON_INTERPRET=1`` tiles are upcast to fp32 before every dot and outputs are pre-filled
with NaN, so an unwritten element shows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from .linear_torch import with_ones

WINDOWS = (16, 32, 64, 128)


def _tile(n: int, cap: int = 64) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


@triton.jit
def _load_rows(PTR, bh, T, t, cols, width):
    """Tile ``[rows t, columns cols]`` of a contiguous ``[BH, T, width]`` tensor; zeros outside it."""
    mask = (t[:, None] >= 0) & (t[:, None] < T) & (cols[None, :] < width)
    return tl.load(PTR + (bh * T + t[:, None]) * width + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(PTR, bh, T, t, cols, width, value):
    """Store a tile into a contiguous ``[BH, T, width]`` tensor, skipping what lies outside it."""
    mask = (t[:, None] >= 0) & (t[:, None] < T) & (cols[None, :] < width)
    tl.store(PTR + (bh * T + t[:, None]) * width + cols[None, :], value, mask=mask)


# ---------------------------------------------------------------- linear attention, forward


@triton.jit
def _state_fwd(FK, V, H0, HS, HT, T, NT, K, DV,
               HAS_H0: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ok = ik * BK + tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    ot = tl.arange(0, C)
    kv_mask = (ok[:, None] < K) & (ov[None, :] < DV)
    h = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        h += tl.load(H0 + bh * K * DV + ok[:, None] * DV + ov[None, :], mask=kv_mask, other=0.0)
    for c in range(NT):
        tl.store(HS + ((bh * NT + c) * K + ok[:, None]) * DV + ov[None, :], h, mask=kv_mask)
        t = c * C + ot
        fk = _load_rows(FK, bh, T, t, ok, K)
        v = _load_rows(V, bh, T, t, ov, DV)
        if UPCAST:
            fk, v = fk.to(tl.float32), v.to(tl.float32)
        h += tl.dot(tl.trans(fk), v)
    tl.store(HT + bh * K * DV + ok[:, None] * DV + ov[None, :], h, mask=kv_mask)


@triton.jit
def _output_fwd(FQ, FK, V, HS, O, T, NT, K, DV,
                INTRA: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    c, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ot = tl.arange(0, C)
    t = c * C + ot
    ov = iv * BV + tl.arange(0, BV)
    acc = tl.zeros([C, BV], tl.float32)
    a = tl.zeros([C, C], tl.float32)
    for ik in range(tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        fq = _load_rows(FQ, bh, T, t, ok, K)
        h = tl.load(HS + ((bh * NT + c) * K + ok[:, None]) * DV + ov[None, :],
                    mask=(ok[:, None] < K) & (ov[None, :] < DV), other=0.0)
        if UPCAST:
            fq = fq.to(tl.float32)
        acc += tl.dot(fq.to(h.dtype), h)
        if INTRA:
            fk = _load_rows(FK, bh, T, t, ok, K)
            if UPCAST:
                fk = fk.to(tl.float32)
            a += tl.dot(fq, tl.trans(fk))
    if INTRA:
        a = tl.where(ot[None, :] <= ot[:, None], a, 0.0)
        v = _load_rows(V, bh, T, t, ov, DV)
        acc += tl.dot(a, v.to(tl.float32))
    _store_rows(O, bh, T, t, ov, DV, acc)


# ---------------------------------------------------------------- linear attention, backward


@triton.jit
def _state_bwd(FQ, DO, GS, DH0, T, NT, K, DV, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               UPCAST: tl.constexpr):
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ok = ik * BK + tl.arange(0, BK)
    ov = iv * BV + tl.arange(0, BV)
    ot = tl.arange(0, C)
    kv_mask = (ok[:, None] < K) & (ov[None, :] < DV)
    g = tl.zeros([BK, BV], tl.float32)
    for i in range(NT):
        c = NT - 1 - i
        tl.store(GS + ((bh * NT + c) * K + ok[:, None]) * DV + ov[None, :], g, mask=kv_mask)
        t = c * C + ot
        fq = _load_rows(FQ, bh, T, t, ok, K)
        do = _load_rows(DO, bh, T, t, ov, DV)
        if UPCAST:
            fq = fq.to(tl.float32)
        g += tl.dot(tl.trans(fq), do.to(fq.dtype))
    tl.store(DH0 + bh * K * DV + ok[:, None] * DV + ov[None, :], g, mask=kv_mask)


@triton.jit
def _grad_qk(FQ, FK, V, DO, HS, GS, DFQ, DFK, T, NT, K, DV,
             INTRA: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    c, ik, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ot = tl.arange(0, C)
    t = c * C + ot
    ok = ik * BK + tl.arange(0, BK)
    dq = tl.zeros([C, BK], tl.float32)
    dk = tl.zeros([C, BK], tl.float32)
    da = tl.zeros([C, C], tl.float32)
    for iv in range(tl.cdiv(DV, BV)):
        ov = iv * BV + tl.arange(0, BV)
        do = _load_rows(DO, bh, T, t, ov, DV).to(tl.float32)
        v = _load_rows(V, bh, T, t, ov, DV).to(tl.float32)
        kv_off = ((bh * NT + c) * K + ok[:, None]) * DV + ov[None, :]
        kv_mask = (ok[:, None] < K) & (ov[None, :] < DV)
        h = tl.load(HS + kv_off, mask=kv_mask, other=0.0)
        g = tl.load(GS + kv_off, mask=kv_mask, other=0.0)
        dq += tl.dot(do, tl.trans(h))
        dk += tl.dot(v, tl.trans(g))
        if INTRA:
            da += tl.dot(do, tl.trans(v))
    if INTRA:
        da = tl.where(ot[None, :] <= ot[:, None], da, 0.0)
        fq = _load_rows(FQ, bh, T, t, ok, K).to(tl.float32)
        fk = _load_rows(FK, bh, T, t, ok, K).to(tl.float32)
        dq += tl.dot(da, fk)
        dk += tl.dot(tl.trans(da), fq)
    _store_rows(DFQ, bh, T, t, ok, K, dq)
    _store_rows(DFK, bh, T, t, ok, K, dk)


@triton.jit
def _grad_v(FQ, FK, DO, GS, DV_OUT, T, NT, K, DV,
            INTRA: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    c, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ot = tl.arange(0, C)
    t = c * C + ot
    ov = iv * BV + tl.arange(0, BV)
    dv = tl.zeros([C, BV], tl.float32)
    a = tl.zeros([C, C], tl.float32)
    for ik in range(tl.cdiv(K, BK)):
        ok = ik * BK + tl.arange(0, BK)
        fk = _load_rows(FK, bh, T, t, ok, K).to(tl.float32)
        g = tl.load(GS + ((bh * NT + c) * K + ok[:, None]) * DV + ov[None, :],
                    mask=(ok[:, None] < K) & (ov[None, :] < DV), other=0.0)
        dv += tl.dot(fk, g)
        if INTRA:
            fq = _load_rows(FQ, bh, T, t, ok, K).to(tl.float32)
            a += tl.dot(fq, tl.trans(fk))
    if INTRA:
        a = tl.where(ot[None, :] <= ot[:, None], a, 0.0)
        do = _load_rows(DO, bh, T, t, ov, DV).to(tl.float32)
        dv += tl.dot(tl.trans(a), do)
    _store_rows(DV_OUT, bh, T, t, ov, DV, dv)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:]).contiguous()


class _ChunkedLinear(torch.autograd.Function):
    """``(o [B,H,T,V'], final state [B,H,K,V'])`` = unnormalised causal linear attention of ``fq, fk``
    over ``v`` (no normalisation; ``v`` is usually ``[v, 1]``), from ``h0`` (or zero)."""

    @staticmethod
    def forward(ctx, fq, fk, v, h0, chunk: int, intra: bool):
        batch, heads, n, k_dim = fq.shape
        dv_dim = v.shape[-1]
        n_chunks = triton.cdiv(n, chunk)
        fq_, fk_, v_ = _flat(fq), _flat(fk), _flat(v)
        cap = 32 if chunk >= 128 and fq.dtype == torch.float32 else 64  # fp32 tiles of 128 rows overflow shared memory
        bk, bv = _tile(k_dim, cap), _tile(dv_dim, cap)
        bh = batch * heads
        states = _launch.output((bh, n_chunks, k_dim, dv_dim), torch.float32, fq.device)
        final = _launch.output((bh, k_dim, dv_dim), torch.float32, fq.device)
        h0_ = _flat(h0.float()) if h0 is not None else final
        upcast = _launch.INTERPRET or fq.dtype == torch.float32
        _state_fwd[(triton.cdiv(k_dim, bk), triton.cdiv(dv_dim, bv), bh)](
            fk_, v_, h0_, states, final, n, n_chunks, k_dim, dv_dim,
            HAS_H0=h0 is not None, C=chunk, BK=bk, BV=bv, UPCAST=upcast)
        out = _launch.output((bh, n, dv_dim), torch.float32, fq.device)
        _output_fwd[(n_chunks, triton.cdiv(dv_dim, bv), bh)](
            fq_, fk_, v_, states, out, n, n_chunks, k_dim, dv_dim, INTRA=intra, C=chunk, BK=bk, BV=bv, UPCAST=upcast)
        ctx.save_for_backward(fq_, fk_, v_, states)
        ctx.meta = (batch, heads, n, k_dim, dv_dim, n_chunks, chunk, intra, bk, bv, upcast, fq.dtype, v.dtype,
                    h0 is not None)
        return out.view(batch, heads, n, dv_dim), final.view(batch, heads, k_dim, dv_dim)

    @staticmethod
    def backward(ctx, d_out, d_final):
        fq_, fk_, v_, states = ctx.saved_tensors
        batch, heads, n, k_dim, dv_dim, n_chunks, chunk, intra, bk, bv, upcast, q_dtype, v_dtype, has_h0 = ctx.meta
        bh = batch * heads
        do_ = _flat(d_out.float())
        grads = _launch.output((bh, n_chunks, k_dim, dv_dim), torch.float32, fq_.device)
        dh0 = _launch.output((bh, k_dim, dv_dim), torch.float32, fq_.device)
        _state_bwd[(triton.cdiv(k_dim, bk), triton.cdiv(dv_dim, bv), bh)](
            fq_, do_, grads, dh0, n, n_chunks, k_dim, dv_dim, C=chunk, BK=bk, BV=bv, UPCAST=upcast)
        if d_final is not None:  # the final state reads every key: it adds to every chunk's g
            grads += _flat(d_final.float())[:, None]
            dh0 += _flat(d_final.float())
        dfq = _launch.output((bh, n, k_dim), torch.float32, fq_.device)
        dfk = _launch.output((bh, n, k_dim), torch.float32, fq_.device)
        _grad_qk[(n_chunks, triton.cdiv(k_dim, bk), bh)](
            fq_, fk_, v_, do_, states, grads, dfq, dfk, n, n_chunks, k_dim, dv_dim,
            INTRA=intra, C=chunk, BK=bk, BV=bv, UPCAST=upcast)
        dv = _launch.output((bh, n, dv_dim), torch.float32, fq_.device)
        _grad_v[(n_chunks, triton.cdiv(dv_dim, bv), bh)](
            fq_, fk_, do_, grads, dv, n, n_chunks, k_dim, dv_dim, INTRA=intra, C=chunk, BK=bk, BV=bv, UPCAST=upcast)
        shape_qk, shape_v = (batch, heads, n, k_dim), (batch, heads, n, dv_dim)
        return (dfq.view(shape_qk).to(q_dtype), dfk.view(shape_qk).to(q_dtype), dv.view(shape_v).to(v_dtype),
                dh0.view(batch, heads, k_dim, dv_dim) if has_h0 else None, None, None)


def linear_attention_triton(fq, fk, v, *, normalize=True, initial_state=None, chunk: int = 64):
    """Triton counterpart of ``linear_attention_torch``: ``(o [B,H,T,V], final state [B,H,K,V+1])``."""
    out, final = _ChunkedLinear.apply(fq, fk, with_ones(v), initial_state, chunk, True)
    o = out[..., :-1] / out[..., -1:] if normalize else out[..., :-1]
    return o.to(v.dtype), final


# ---------------------------------------------------------------- hybrid: window softmax part


@triton.jit
def _window_fwd(Q, K, V, W, M, IDX, T, D, DV, scale,
                TERRACE: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    ot = tl.arange(0, C)
    od = tl.arange(0, BD)
    tq = c * C + ot
    tp = tq - C  # keys of the previous chunk
    q = _load_rows(Q, bh, T, tq, od, D)
    k_own = _load_rows(K, bh, T, tq, od, D)
    k_prev = _load_rows(K, bh, T, tp, od, D)
    if UPCAST:
        q, k_own, k_prev = q.to(tl.float32), k_own.to(tl.float32), k_prev.to(tl.float32)
    s_own = tl.dot(q, tl.trans(k_own)) * scale
    s_prev = tl.dot(q, tl.trans(k_prev)) * scale
    own_ok = (ot[None, :] <= ot[:, None]) & (tq[None, :] < T)
    prev_ok = (tp[None, :] >= 0) & (ot[:, None] >= 0)
    if not TERRACE:
        prev_ok = prev_ok & (ot[None, :] > ot[:, None])
    s_own = tl.where(own_ok, s_own, float("-inf"))
    s_prev = tl.where(prev_ok, s_prev, float("-inf"))
    max_own = tl.max(s_own, 1)
    max_prev = tl.max(s_prev, 1)
    m = tl.maximum(max_own, max_prev)
    idx = tl.where(max_own > max_prev, c * C + tl.argmax(s_own, 1), (c - 1) * C + tl.argmax(s_prev, 1))
    p_own = tl.where(own_ok, tl.exp(s_own - m[:, None]), 0.0)
    p_prev = tl.where(prev_ok, tl.exp(s_prev - m[:, None]), 0.0)
    for v0 in range(0, DV, BV):  # value columns in tiles of BV
        ov = v0 + tl.arange(0, BV)
        v_own = _load_rows(V, bh, T, tq, ov, DV).to(tl.float32)
        v_prev = _load_rows(V, bh, T, tp, ov, DV).to(tl.float32)
        _store_rows(W, bh, T, tq, ov, DV, tl.dot(p_own, v_own) + tl.dot(p_prev, v_prev))
    row_ok = tq < T
    tl.store(M + bh * T + tq, m, mask=row_ok)
    tl.store(IDX + bh * T + tq, idx.to(tl.int64), mask=row_ok)


@triton.jit
def _window_probs(q, k, m, tq, tk, prev: tl.constexpr, T, scale, TERRACE: tl.constexpr, C: tl.constexpr):
    """``P [C, C]`` of query rows ``tq`` on key columns ``tk`` (the own or the previous chunk) at fixed ``m``."""
    s = tl.dot(q, tl.trans(k)) * scale
    oq = tq % C
    ok_ = tk % C
    if prev:
        allowed = (tk[None, :] >= 0) & (tq[:, None] < T)
        if not TERRACE:
            allowed = allowed & (ok_[None, :] > oq[:, None])
    else:
        allowed = (ok_[None, :] <= oq[:, None]) & (tk[None, :] < T) & (tq[:, None] < T)
    return tl.where(allowed, tl.exp(s - m[:, None]), 0.0)


@triton.jit
def _window_dp(DW, V, bh, T, tq, tk, DV, C: tl.constexpr, BV: tl.constexpr):
    """``dP [C, C] = dW[tq] V[tk]ᵀ``, summed over value tiles of ``BV``."""
    dp = tl.zeros([C, C], tl.float32)
    for v0 in range(0, DV, BV):
        ov = v0 + tl.arange(0, BV)
        dw = _load_rows(DW, bh, T, tq, ov, DV).to(tl.float32)
        v = _load_rows(V, bh, T, tk, ov, DV).to(tl.float32)
        dp += tl.dot(dw, tl.trans(v))
    return dp


@triton.jit
def _window_bwd_q(Q, K, V, M, DW, DQ, T, D, DV, scale,
                  TERRACE: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    ot = tl.arange(0, C)
    od = tl.arange(0, BD)
    tq = c * C + ot
    q = _load_rows(Q, bh, T, tq, od, D)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.load(M + bh * T + tq, mask=tq < T, other=0.0)
    dq = tl.zeros([C, BD], tl.float32)
    for j in tl.static_range(2):
        tk = tq - j * C
        k = _load_rows(K, bh, T, tk, od, D)
        if UPCAST:
            k = k.to(tl.float32)
        p = _window_probs(q, k, m, tq, tk, j == 1, T, scale, TERRACE, C)
        ds = p * _window_dp(DW, V, bh, T, tq, tk, DV, C, BV)
        dq += tl.dot(ds.to(k.dtype), k) * scale
    _store_rows(DQ, bh, T, tq, od, D, dq)


@triton.jit
def _window_bwd_kv(Q, K, V, M, DW, DK, DVV, T, D, DV, scale,
                   TERRACE: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, UPCAST: tl.constexpr):
    c, bh = tl.program_id(0), tl.program_id(1)
    ot = tl.arange(0, C)
    od = tl.arange(0, BD)
    tk = c * C + ot
    k = _load_rows(K, bh, T, tk, od, D)
    if UPCAST:
        k = k.to(tl.float32)
    dk = tl.zeros([C, BD], tl.float32)
    for j in tl.static_range(2):  # queries of the own chunk (j = 0) and of the next one (j = 1)
        tq = tk + j * C
        q = _load_rows(Q, bh, T, tq, od, D)
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.load(M + bh * T + tq, mask=tq < T, other=0.0)
        p = _window_probs(q, k, m, tq, tk, j == 1, T, scale, TERRACE, C)
        ds = p * _window_dp(DW, V, bh, T, tq, tk, DV, C, BV)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q) * scale
        for v0 in range(0, DV, BV):  # dV[tk] += Pᵀ dW[tq], tile by tile; this program owns rows tk
            ov = v0 + tl.arange(0, BV)
            dv = tl.dot(tl.trans(p), _load_rows(DW, bh, T, tq, ov, DV).to(tl.float32))
            if j == 1:
                tl.debug_barrier()
                dv += _load_rows(DVV, bh, T, tk, ov, DV)
            _store_rows(DVV, bh, T, tk, ov, DV, dv)
    _store_rows(DK, bh, T, tk, od, D, dk)


class _Window(torch.autograd.Function):
    """``(W [B,H,T,V'], m [B,H,T], argmax [B,H,T])``: ``W_n = Σ_{i∈W_n} e^{s_ni − m_n} v_i`` with the
    window maximum ``m_n`` and its key; differentiated at fixed ``m`` (see :func:`_window_part`)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, window: int, terrace: bool):
        batch, heads, n, d = q.shape
        dv_dim = v.shape[-1]
        q_, k_, v_ = _flat(q), _flat(k), _flat(v)
        bh = batch * heads
        w = _launch.output((bh, n, dv_dim), torch.float32, q.device)
        m = _launch.output((bh, n), torch.float32, q.device)
        idx = torch.full((bh, n), -1, dtype=torch.int64, device=q.device)
        meta = dict(TERRACE=terrace, C=window, BD=max(16, triton.next_power_of_2(d)),
                    BV=min(64, max(16, triton.next_power_of_2(dv_dim))), UPCAST=_launch.INTERPRET or q.dtype == torch.float32)
        _window_fwd[(triton.cdiv(n, window), bh)](q_, k_, v_, w, m, idx, n, d, dv_dim, scale, **meta)
        ctx.save_for_backward(q_, k_, v_, m)
        ctx.meta, ctx.shape, ctx.scale = meta, (batch, heads, n, d, dv_dim), scale
        ctx.dtypes = (q.dtype, v.dtype)
        ctx.mark_non_differentiable(m, idx)
        return w.view(batch, heads, n, dv_dim), m.view(batch, heads, n), idx.view(batch, heads, n)

    @staticmethod
    def backward(ctx, d_w, _dm, _didx):
        q_, k_, v_, m = ctx.saved_tensors
        batch, heads, n, d, dv_dim = ctx.shape
        bh, window = batch * heads, ctx.meta["C"]
        dw = _flat(d_w.float())
        dq = _launch.output((bh, n, d), torch.float32, q_.device)
        dk = _launch.output((bh, n, d), torch.float32, q_.device)
        dv = _launch.output((bh, n, dv_dim), torch.float32, q_.device)
        grid = (triton.cdiv(n, window), bh)
        _window_bwd_q[grid](q_, k_, v_, m, dw, dq, n, d, dv_dim, ctx.scale, **ctx.meta)
        _window_bwd_kv[grid](q_, k_, v_, m, dw, dk, dv, n, d, dv_dim, ctx.scale, **ctx.meta)
        q_dtype, v_dtype = ctx.dtypes
        return (dq.view(batch, heads, n, d).to(q_dtype), dk.view(batch, heads, n, d).to(q_dtype),
                dv.view(batch, heads, n, dv_dim).to(v_dtype), None, None, None)


def _window_part(q, k, v1, scale: float, window: int, terrace: bool) -> torch.Tensor:
    """``Σ_{W_n} e^{s − m_n} [v, 1]`` with the gradient through the window maximum ``m_n``: the
    kernel differentiates at fixed ``m``; ``m`` recomputed in torch from the maximal key adds
    ``∂/∂m = −W`` (the value is unchanged: the factor is exactly one)."""
    w, _, idx = _Window.apply(q, k, v1, scale, window, terrace)
    k_max = torch.gather(k, 2, idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))
    m = (q.float() * k_max.float()).sum(-1, keepdim=True) * scale
    return w * torch.exp(m.detach() - m)


def _shift(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``x`` delayed by one chunk along time (zeros first)."""
    return torch.nn.functional.pad(x, (0, 0, chunk, 0))[:, :, : x.shape[2]]


def hybrid_unsupported(window: int, dtype: torch.dtype) -> str | None:
    """Why the Triton hybrid kernel cannot run ``window`` in ``dtype``, or None when it can: windows
    are :data:`WINDOWS`, and the backward's fp32 tiles of a 128-window exceed sm_90 shared memory."""
    if window not in WINDOWS:
        return f"the Triton hybrid kernel supports windows {WINDOWS}, got {window}"
    if window == 128 and dtype == torch.float32 and not _launch.INTERPRET:
        return "the Triton hybrid kernel runs window 128 in bf16/fp16 only (fp32 tiles exceed shared memory)"
    return None


def hybrid_attention_triton(q, k, v, fq, fk, gamma, *, window: int, terrace: bool, scale: float):
    """Triton counterpart of ``hybrid_attention_torch`` (see :func:`hybrid_unsupported`)."""
    reason = hybrid_unsupported(window, q.dtype)
    if reason:
        raise ValueError(f"{reason}; use backend='torch'")
    v1 = with_ones(v)
    lin, _ = _ChunkedLinear.apply(fq, _shift(fk, window), _shift(v1, window), None, window, not terrace)
    soft = _window_part(q, k, v1, scale, window, terrace)
    num = lin + gamma.float()[None, :, None, None] * soft
    return (num[..., :-1] / num[..., -1:]).to(v.dtype)
