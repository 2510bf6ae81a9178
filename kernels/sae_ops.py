"""Sparse autoencoder ops (docs/guides/gpu.md): the TopK encoder and the sparse decoder, forward and backward.

``topk_encode(x, W_enc, b_enc, b_dec, k)`` returns ``(values [B, k], indices [B, k])`` of
``TopK(ReLU((x − b_dec) W_enc + b_enc))``; its backward touches only the ``k`` chosen latents
(``∂W_enc`` and ``∂b_enc`` by sparse index-add, ``∂b_dec = −Σ_r ∂values · W_enc[:, idx]``).
``sparse_decode(values, indices, W_dec, b_dec)`` returns ``x̂ [B, d]`` = ``Σ_r values[:, r] ·
W_dec[indices[:, r]] + b_dec`` through ``embedding_bag`` (forward and backward cost ``O(B·k·d)``,
never the dense ``B × d_sae`` code).

``backend="auto"`` picks the Triton kernels (:mod:`.sae_triton`) for CUDA tensors with ``k ≤ 512``
and the torch path (sparse ``index_add``/``embedding_bag``) otherwise; ``"triton"`` forces the
kernels (on CPU tensors only under ``TRITON_INTERPRET=1``); ``"torch"`` forces the torch path.

``dense_reference_*`` are the specifications (dense codes, plain matmuls) the tests compare
against. ``x`` is never differentiated (it is data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_stats import resolve_backend

MAX_TRITON_K = 512  # larger k falls back to the torch path


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_enc, b_enc, b_dec, k: int):
        pre = torch.addmm(b_enc, x - b_dec, w_enc)  # [B, n]
        values, indices = pre.topk(k, dim=-1)
        values = values.clamp(min=0)
        ctx.save_for_backward(x, w_enc, b_dec, indices, values)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _):
        x, w_enc, b_dec, indices, values = ctx.saved_tensors
        d_pre = grad_values * (values > 0)  # ReLU's gradient on the k chosen latents
        n_rows, k = indices.shape
        n_latents = w_enc.shape[1]
        rows = torch.arange(n_rows, device=x.device).repeat_interleave(k)
        # [n, B] sparse matrix of the chosen (latent, row) gradients
        chosen = torch.sparse_coo_tensor(torch.stack([indices.flatten(), rows]), d_pre.flatten(),
                                         (n_latents, n_rows), check_invariants=False).coalesce()
        grad_w = torch.sparse.mm(chosen, x - b_dec).t() if ctx.needs_input_grad[1] else None
        per_latent = torch.zeros(n_latents, dtype=d_pre.dtype, device=d_pre.device).index_add_(
            0, indices.flatten(), d_pre.flatten())  # Σ over rows of ∂pre, [n]
        grad_b_dec = -(w_enc @ per_latent) if ctx.needs_input_grad[3] else None
        return None, grad_w, per_latent if ctx.needs_input_grad[2] else None, grad_b_dec, None


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The float tensors cast to the autocast dtype when autocast is on for their device (so the
    encoder GEMM runs in bf16/fp16 with fp32 master weights, as under autocast any matmul would)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _use_triton(backend: str, device: torch.device, k: int) -> bool:
    if resolve_backend(backend, device) != "triton":
        return False
    if k > MAX_TRITON_K:
        if backend == "triton":
            raise ValueError(f"the Triton SAE kernels handle k up to {MAX_TRITON_K}, got {k}; use backend='torch'")
        return False
    return True


def topk_encode(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, k: int,
                backend: str = "auto"):
    """``(values [B, k], indices [B, k])``: the ``k`` largest of ``ReLU((x − b_dec) W_enc + b_enc)``
    per row (``x [B, d]``, ``W_enc [d, n]``), with a backward that only touches chosen latents."""
    if not 0 < k <= w_enc.shape[1]:
        raise ValueError(f"k must be in 1..{w_enc.shape[1]}, got {k}")
    if x.dim() != 2 or tuple(w_enc.shape) != (x.shape[1], b_enc.shape[0]) or b_dec.shape != (x.shape[1],):
        raise ValueError(f"expected x [B, d], W_enc [d, n], b_enc [n], b_dec [d]; got {tuple(x.shape)}, "
                         f"{tuple(w_enc.shape)}, {tuple(b_enc.shape)}, {tuple(b_dec.shape)}")
    x, w_enc, b_enc, b_dec = _autocast(x, w_enc, b_enc, b_dec)
    if _use_triton(backend, x.device, k):
        from .sae_triton import topk_encode_triton

        return topk_encode_triton(x, w_enc, b_enc, b_dec, k)
    with torch.autocast(x.device.type, enabled=False):
        return _TopKEncode.apply(x, w_enc, b_enc, b_dec, k)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """``x̂ [B, d] = Σ_r values[:, r] · W_dec[indices[:, r]] + b_dec`` (``W_dec [n, d]``)."""
    if values.shape != indices.shape or values.dim() != 2 or b_dec.shape != w_dec.shape[1:]:
        raise ValueError(f"expected values and indices [B, k], W_dec [n, d], b_dec [d]; got {tuple(values.shape)}, "
                         f"{tuple(indices.shape)}, {tuple(w_dec.shape)}, {tuple(b_dec.shape)}")
    values, w_dec, b_dec = _autocast(values, w_dec, b_dec)
    if _use_triton(backend, values.device, values.shape[1]):
        from .sae_triton import sparse_decode_triton

        return sparse_decode_triton(values, indices, w_dec, b_dec)
    return F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum") + b_dec


def dense_codes(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The dense ``[B, n]`` code of a sparse ``(values, indices)`` pair."""
    return torch.zeros(values.shape[0], n_latents, dtype=values.dtype, device=values.device).scatter(1, indices, values)


def dense_reference_encode(x, w_enc, b_enc, b_dec, k: int) -> torch.Tensor:
    """Dense ``[B, n]`` TopK code: the specification of :func:`topk_encode`."""
    pre = F.relu((x - b_dec) @ w_enc + b_enc)
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(1, indices, values)


def dense_reference_decode(codes, w_dec, b_dec) -> torch.Tensor:
    """``codes @ W_dec + b_dec``: the specification of :func:`sparse_decode`."""
    return codes @ w_dec + b_dec
