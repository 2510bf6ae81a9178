"""Public entry points of the TopK sparse autoencoder's ops (docs/guides/gpu.md): the encoder and the
sparse decoder, forward and backward.

``topk_encode(x, W_enc, b_enc, b_dec, k)`` returns ``(values [B, k], indices [B, k])`` of
``TopK(ReLU((x − b_dec) W_enc + b_enc))``; ``sparse_decode(values, indices, W_dec, b_dec)`` returns
``x̂ [B, d]`` = ``Σ_r values[:, r] · W_dec[indices[:, r]] + b_dec``; both with backwards that never
form the dense ``B × d_sae`` code. ``backend`` as in :mod:`._backend`; ``"auto"`` keeps the torch
path (:mod:`.sae_codes_torch`) for ``k`` above :data:`MAX_TRITON_K` (:mod:`.sae_codes_triton`).
Specification: :mod:`.reference`. ``x`` is never differentiated (it is data).
"""

from __future__ import annotations

from functools import partial

import torch

from ._backend import resolve_backend
from .ops import REFERENCE, AttentionInputs, Case, Op, Outputs, gradients, leaf, register_op
from .reference import sparse_decode_reference, topk_encode_reference
from .sae_codes_torch import sparse_decode_torch, topk_encode_torch

MAX_TRITON_K = 512  # larger k falls back to the torch path


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The float tensors cast to the autocast dtype when autocast is on for their device (so the
    encoder GEMM runs in bf16/fp16 with fp32 master weights, as under autocast any matmul would)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _use_triton(backend: str, device: torch.device, k: int, op: str) -> bool:
    if resolve_backend(backend, device, op) != "triton":
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
    if _use_triton(backend, x.device, k, "topk_encode"):
        from .sae_codes_triton import topk_encode_triton

        return topk_encode_triton(x, w_enc, b_enc, b_dec, k)
    return topk_encode_torch(x, w_enc, b_enc, b_dec, k)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor,
                  backend: str = "auto") -> torch.Tensor:
    """``x̂ [B, d] = Σ_r values[:, r] · W_dec[indices[:, r]] + b_dec`` (``W_dec [n, d]``)."""
    if values.shape != indices.shape or values.dim() != 2 or b_dec.shape != w_dec.shape[1:]:
        raise ValueError(f"expected values and indices [B, k], W_dec [n, d], b_dec [d]; got {tuple(values.shape)}, "
                         f"{tuple(indices.shape)}, {tuple(w_dec.shape)}, {tuple(b_dec.shape)}")
    values, w_dec, b_dec = _autocast(values, w_dec, b_dec)
    if _use_triton(backend, values.device, values.shape[1], "sparse_decode"):
        from .sae_codes_triton import sparse_decode_triton

        return sparse_decode_triton(values, indices, w_dec, b_dec)
    return sparse_decode_torch(values, indices, w_dec, b_dec)


def dense_codes(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The dense ``[B, n]`` code of a sparse ``(values, indices)`` pair."""
    return torch.zeros(values.shape[0], n_latents, dtype=values.dtype, device=values.device).scatter(1, indices, values)


def _dictionary(call: AttentionInputs, expansion: int = 4):
    """``(x [B·N, Hq·D], W_enc, b_enc, b_dec, W_dec)``: the call's queries as inputs and a random
    dictionary of ``expansion`` latents per input dimension (seeded, drawn on the CPU)."""
    x = call.q.transpose(1, 2).reshape(-1, call.q.shape[1] * call.q.shape[3])
    d, generator = x.shape[1], torch.Generator().manual_seed(0)

    def draw(*shape, scale=d ** -0.5):
        return (torch.randn(*shape, generator=generator) * scale).to(x.device, x.dtype)

    return x, draw(d, expansion * d), draw(expansion * d, scale=0.1), draw(d, scale=0.1), draw(expansion * d, d)


def _encode_cases(call: AttentionInputs) -> list[Case]:
    x, w_enc, b_enc, b_dec, _ = _dictionary(call)

    def run(backend: str) -> Outputs:
        leaves = {"w_enc": leaf(w_enc), "b_enc": leaf(b_enc), "b_dec": leaf(b_dec)}
        function = topk_encode_reference if backend == REFERENCE else partial(topk_encode, backend=backend)
        values, _ = function(x, *leaves.values(), 4)
        return {"values": values.detach(), **gradients(values, leaves)}

    return [Case("k 4", run)]


def _decode_cases(call: AttentionInputs) -> list[Case]:
    x, _, _, b_dec, w_dec = _dictionary(call)
    k, generator = 4, torch.Generator().manual_seed(1)
    indices = torch.stack([torch.randperm(w_dec.shape[0], generator=generator)[:k] for _ in range(x.shape[0])])
    values = x[:, :k].abs()

    def run(backend: str) -> Outputs:
        leaves = {"values": leaf(values), "w_dec": leaf(w_dec), "b_dec": leaf(b_dec)}
        function = sparse_decode_reference if backend == REFERENCE else partial(sparse_decode, backend=backend)
        out = function(leaves["values"], indices.to(x.device), leaves["w_dec"], leaves["b_dec"])
        return {"x_hat": out.detach(), **gradients(out, leaves)}

    return [Case("k 4", run)]


register_op(Op("topk_encode", "the k largest ReLU pre-activations of a TopK autoencoder", ("torch", "triton"),
               _encode_cases))
register_op(Op("sparse_decode", "a sparse code's reconstruction through the decoder rows it names",
               ("torch", "triton"), _decode_cases))


__all__ = ["MAX_TRITON_K", "dense_codes", "sparse_decode", "topk_encode"]
