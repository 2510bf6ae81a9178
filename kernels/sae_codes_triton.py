"""Triton kernels for the TopK sparse autoencoder (docs/guides/gpu.md): the fused TopK encoder and the sparse
decoder, forward and backward. Semantics are those of :mod:`.reference`'s ``topk_encode_reference`` and ``sparse_decode_reference``.

Shapes: ``x [B, d]``, ``W_enc [d, n]``, ``b_enc [n]``, ``b_dec [d]``, ``W_dec [n, d]``, codes as
``(values [B, k], indices [B, k])``.

* ``_encode_fwd``: each program owns ``BM`` rows and a group of ``TILES`` latent tiles of ``BN``;
  per tile it computes ``pre = (x − b_dec) W_enc + b_enc`` with ``tl.dot``, applies ReLU and merges
  the tile into a running top-``KT`` of the group. Candidates are packed into int64 keys
  ``(fp32 bits of the value) << 32 | latent``: a non-negative float's bits order like the float, so
  one integer maximum picks value and latent together, ties broken by the larger latent. The top
  ``k`` of the ``B × groups·KT`` candidates (``KT ≥ k``, so exact) is one ``torch.topk`` on the keys.
* ``_decode_fwd``: embedding-bag rows, ``x̂_b = Σ_r values[b, r] · W_dec[indices[b, r]] + b_dec``.
* ``_decode_grad_values``: ``∂values[b, r] = ⟨∂x̂_b, W_dec[indices[b, r]]⟩``.
* ``_segment_sum``: the weight gradients. The ``B·k`` (row, latent) pairs are sorted by latent
  (stable), and one program per latent and column tile sums ``weight · (source row − shift)`` over
  its own pairs in a fixed order: ``∂W_dec[j] = Σ values · ∂x̂_b`` and ``∂W_enc[:, j] = Σ ∂pre ·
  (x_b − b_dec)``, with ``∂b_enc[j] = Σ ∂pre``. Every latent is written (zeros where unchosen), no
  atomics, so gradients are deterministic and a resumed run stays bit-identical.

``x`` is data and is never differentiated. Under ``TRITON_INTERPRET=1`` tiles are upcast to fp32
before every dot and outputs are pre-filled with NaN (:mod:`._launch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

NO_KEY = torch.iinfo(torch.int64).min


@triton.jit
def _merge_topk(best, key, slots, KT: tl.constexpr, NO_KEY: tl.constexpr):
    """The ``KT`` largest of the union of ``best [BM, KT]`` and ``key [BM, BN]``, in descending order."""
    merged = tl.full(best.shape, NO_KEY, tl.int64)
    for r in range(KT):
        top = tl.maximum(tl.max(key, axis=1), tl.max(best, axis=1))
        merged = tl.where(slots[None, :] == r, top[:, None], merged)
        key = tl.where(key == top[:, None], NO_KEY, key)
        best = tl.where(best == top[:, None], NO_KEY, best)
    return merged


@triton.jit
def _encode_fwd(X, WE, BE, BD, KEYS, B, D, N, GROUPS,
                KT: tl.constexpr, TILES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                NO_KEY: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, group = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    slots = tl.arange(0, KT)
    best = tl.full([BM, KT], NO_KEY, tl.int64)
    for tile in range(TILES):
        cols = (group * TILES + tile) * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], tl.float32)
        for d0 in range(0, D, BK):
            dd = d0 + tl.arange(0, BK)
            x = tl.load(X + rows[:, None] * D + dd[None, :], mask=(rows[:, None] < B) & (dd[None, :] < D), other=0.0)
            shift = tl.load(BD + dd, mask=dd < D, other=0.0)
            centred = (x.to(tl.float32) - shift.to(tl.float32)[None, :]).to(x.dtype)
            w = tl.load(WE + dd[:, None] * N + cols[None, :], mask=(dd[:, None] < D) & (cols[None, :] < N), other=0.0)
            if UPCAST:
                centred, w = centred.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(centred, w)
        acc += tl.load(BE + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(acc > 0, acc, 0.0)  # ReLU, and +0.0 rather than −0.0 so the bits stay ordered
        key = (acc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols.to(tl.int64)[None, :]
        key = tl.where(cols[None, :] < N, key, NO_KEY)
        best = _merge_topk(best, key, slots, KT, NO_KEY)
    tl.store(KEYS + (rows[:, None] * GROUPS + group) * KT + slots[None, :], best, mask=rows[:, None] < B)


@triton.jit
def _decode_fwd(VALS, IDX, WD, BD, OUT, B, K, D, BM: tl.constexpr, BDIM: tl.constexpr):
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    dd = pid_d * BDIM + tl.arange(0, BDIM)
    row_ok, d_ok = rows < B, dd < D
    acc = tl.zeros([BM, BDIM], tl.float32)
    for r in range(K):
        latent = tl.load(IDX + rows * K + r, mask=row_ok, other=0)
        value = tl.load(VALS + rows * K + r, mask=row_ok, other=0.0).to(tl.float32)
        w = tl.load(WD + latent[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += value[:, None] * w.to(tl.float32)
    acc += tl.load(BD + dd, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * D + dd[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_grad_values(GOUT, IDX, WD, GVALS, B, K, D, BM: tl.constexpr, BDIM: tl.constexpr):
    pid_m, r = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < B
    latent = tl.load(IDX + rows * K + r, mask=row_ok, other=0)
    acc = tl.zeros([BM], tl.float32)
    for d0 in range(0, D, BDIM):
        dd = d0 + tl.arange(0, BDIM)
        mask = row_ok[:, None] & (dd[None, :] < D)
        w = tl.load(WD + latent[:, None] * D + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GOUT + rows[:, None] * D + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(w * g, axis=1)
    tl.store(GVALS + rows * K + r, acc, mask=row_ok)


@triton.jit
def _segment_sum(ORDER, STARTS, COUNTS, WEIGHTS, SRC, SHIFT, OUT, WSUM, K, D, stride_latent, stride_d,
                 HAS_SHIFT: tl.constexpr, HAS_WSUM: tl.constexpr, BP: tl.constexpr, BDIM: tl.constexpr):
    latent, pid_d = tl.program_id(0), tl.program_id(1)
    dd = pid_d * BDIM + tl.arange(0, BDIM)
    d_ok = dd < D
    start = tl.load(STARTS + latent)
    count = tl.load(COUNTS + latent)
    shift = tl.zeros([BDIM], tl.float32)
    if HAS_SHIFT:
        shift = tl.load(SHIFT + dd, mask=d_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BDIM], tl.float32)
    total = tl.zeros([BP], tl.float32)
    for p0 in range(0, count, BP):
        p = p0 + tl.arange(0, BP)
        ok = p < count
        pair = tl.load(ORDER + start + p, mask=ok, other=0)
        weight = tl.load(WEIGHTS + pair, mask=ok, other=0.0)
        src = tl.load(SRC + (pair // K)[:, None] * D + dd[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(weight[:, None] * (src.to(tl.float32) - shift[None, :]), axis=0)
        total += weight
    tl.store(OUT + latent * stride_latent + dd * stride_d, acc, mask=d_ok)
    if HAS_WSUM:
        if pid_d == 0:
            tl.store(WSUM + latent, tl.sum(total, axis=0))


def _check_dtypes(*tensors):
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton SAE kernels need one float dtype (fp32, fp16 or bf16), got {sorted(map(str, dtypes))}")


def _column_block(d: int) -> int:
    """Width of the column tiles over ``d`` features."""
    return min(128, max(16, triton.next_power_of_2(d)))


def _by_latent(indices: torch.Tensor, n_latents: int):
    """``(order, starts, counts)``: the flat (row, latent) pairs sorted by latent, stably."""
    flat = indices.flatten()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_latents)
    return order, torch.cumsum(counts, 0) - counts, counts


def _segment_sum_launch(indices, weights, source, shift, out, stride_latent, stride_d, weight_sums=None):
    """Fill ``out`` with ``Σ_{pairs of latent j} weight · (source[row] − shift)`` per latent ``j``."""
    n_latents = out.numel() // source.shape[1]
    order, starts, counts = _by_latent(indices, n_latents)
    d = source.shape[1]
    block = _column_block(d)
    _segment_sum[(n_latents, triton.cdiv(d, block))](
        order, starts, counts, weights.contiguous(), source, shift if shift is not None else source,
        out, weight_sums if weight_sums is not None else out, indices.shape[1], d, stride_latent, stride_d,
        HAS_SHIFT=shift is not None, HAS_WSUM=weight_sums is not None, BP=16, BDIM=block)


def _encode_candidates(x, w_enc, b_enc, b_dec, k):
    """int64 keys ``[B, groups·KT]`` of every group's top-``KT`` latents."""
    rows, d = x.shape
    n = w_enc.shape[1]
    kt = triton.next_power_of_2(k)
    bm, bn, bk = (16, 32, 16) if _launch.INTERPRET else (64, 128, 64)
    tiles = max(1, min(8, triton.cdiv(n, bn) // 4))
    groups = triton.cdiv(n, bn * tiles)
    keys = _launch.output((rows, groups, kt), torch.int64, x.device)
    _encode_fwd[(triton.cdiv(rows, bm), groups)](
        x, w_enc, b_enc, b_dec, keys, rows, d, n, groups, KT=kt, TILES=tiles, BM=bm, BN=bn, BK=bk,
        NO_KEY=NO_KEY, UPCAST=_launch.INTERPRET or x.dtype == torch.float32)
    return keys.view(rows, groups * kt)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_dec, k: int):
        keys = _encode_candidates(x, w_enc, b_enc, b_dec, k).topk(k, dim=1).values
        values = (keys >> 32).to(torch.int32).view(torch.float32)
        indices = keys & 0xFFFFFFFF
        ctx.save_for_backward(x, w_enc, b_dec, indices, values)
        ctx.mark_non_differentiable(indices)
        return values.to(x.dtype), indices

    @staticmethod
    def backward(ctx, grad_values, _):
        x, w_enc, b_dec, indices, values = ctx.saved_tensors
        d_pre = (grad_values.float() * (values > 0)).contiguous()  # ReLU's gradient on the chosen latents
        grad_w = _launch.output(w_enc.shape, w_enc.dtype, x.device)
        per_latent = _launch.output((w_enc.shape[1],), torch.float32, x.device)  # Σ_rows ∂pre per latent = ∂b_enc
        _segment_sum_launch(indices, d_pre, x, b_dec, grad_w, 1, w_enc.shape[1], per_latent)
        grad_b_dec = -(w_enc.float() @ per_latent).to(b_dec.dtype) if ctx.needs_input_grad[3] else None
        return None, grad_w, per_latent.to(w_enc.dtype), grad_b_dec, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, w_dec, b_dec):
        rows, k = indices.shape
        d = w_dec.shape[1]
        out = _launch.output((rows, d), w_dec.dtype, w_dec.device)
        block = _column_block(d)
        _decode_fwd[(triton.cdiv(rows, 16), triton.cdiv(d, block))](
            values, indices, w_dec, b_dec, out, rows, k, d, BM=16, BDIM=block)
        ctx.save_for_backward(values, indices, w_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, w_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        rows, k = indices.shape
        d = w_dec.shape[1]
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = _launch.output((rows, k), torch.float32, w_dec.device)
            block = _column_block(d)
            _decode_grad_values[(triton.cdiv(rows, 16), k)](grad_out, indices, w_dec, grad_values, rows, k, d,
                                                           BM=16, BDIM=block)
            grad_values = grad_values.to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = _launch.output(w_dec.shape, w_dec.dtype, w_dec.device)
            _segment_sum_launch(indices, values.float(), grad_out, None, grad_w, d, 1)
        return grad_values, None, grad_w, grad_out.sum(0) if ctx.needs_input_grad[3] else None


def topk_encode_triton(x, w_enc, b_enc, b_dec, k: int):
    """Triton :func:`.sae_codes.topk_encode` (``k`` at most :data:`.sae_codes.MAX_TRITON_K`, which the
    public op checks)."""
    _check_dtypes(x, w_enc, b_enc, b_dec)
    return _TopKEncode.apply(x.contiguous(), w_enc.contiguous(), b_enc.contiguous(), b_dec.contiguous(), k)


def sparse_decode_triton(values, indices, w_dec, b_dec):
    """Triton :func:`.sae_codes.sparse_decode`."""
    _check_dtypes(values, w_dec, b_dec)
    return _SparseDecode.apply(values.contiguous(), indices.contiguous(), w_dec.contiguous(), b_dec.contiguous())
