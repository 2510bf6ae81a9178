"""The torch path of the TopK sparse autoencoder's ops (:mod:`.sae_codes`): an encoder whose backward
touches only the ``k`` chosen latents (``∂W_enc`` and ``∂b_enc`` by sparse index-add,
``∂b_dec = −Σ_r ∂values · W_enc[:, idx]``) and a decoder through ``embedding_bag`` (forward and
backward ``O(B·k·d)``, never the dense ``B × d_sae`` code). Shapes as in :mod:`.sae_codes`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def topk_encode_torch(x, w_enc, b_enc, b_dec, k: int):
    """``(values [B, k], indices [B, k])`` in fp32 or the inputs' dtype (autocast off: the caller casts)."""
    with torch.autocast(x.device.type, enabled=False):
        return _TopKEncode.apply(x, w_enc, b_enc, b_dec, k)


def sparse_decode_torch(values, indices, w_dec, b_dec):
    """``x̂ [B, d]`` through ``embedding_bag`` over the named decoder rows."""
    return F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum") + b_dec


__all__ = ["sparse_decode_torch", "topk_encode_torch"]
