"""Public entry points: causal linear attention and the LoLCATs hybrid (docs/methods/conversion.md).

``backend`` as in :mod:`._backend` (:mod:`.linear_triton`, :mod:`.linear_torch`);
``"auto"`` falls back to torch for hybrid forms the Triton kernels lack (other windows; fp32 with window
128). Both are differentiable. Shapes: ``fq, fk [B, H, T, K]`` (feature-mapped),
``q, k [B, H, T, D]``, ``v [B, H, T, V]`` with heads already GQA-expanded; ``gamma [H]``; a state is
``[B, H, K, V + 1]`` = ``Σ φk [v, 1]``. Specification: :mod:`.reference`.
"""

from __future__ import annotations

from functools import partial

import torch

from ._backend import resolve_backend
from .linear_torch import hybrid_attention_torch, linear_attention_torch
from .ops import REFERENCE, AttentionInputs, Case, Op, Outputs, gradients, leaf, register_op
from .reference import hybrid_attention_reference, linear_attention_reference


def _check(fq, fk, v, q=None, k=None, gamma=None):
    if fq.dim() != 4 or fq.shape != fk.shape:
        raise ValueError(f"fq {tuple(fq.shape)} and fk {tuple(fk.shape)} must both be [B, H, T, K]")
    if v.dim() != 4 or v.shape[:3] != fq.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must be [B, H, T, V] with B, H, T of fq {tuple(fq.shape)}")
    if q is not None and (q.shape != k.shape or q.shape[:3] != fq.shape[:3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, D] matching fq")
    if gamma is not None and tuple(gamma.shape) != (fq.shape[1],):
        raise ValueError(f"gamma must be [H] = [{fq.shape[1]}], got {tuple(gamma.shape)}")


def linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    *,
    normalize: bool = True,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B, H, T, V], final state [B, H, K, V + 1])`` of causal linear attention
    ``o_n = Σ_{j≤n} (φq_n·φk_j) v_j`` (divided by ``Σ_{j≤n} φq_n·φk_j`` when ``normalize``),
    continuing from ``initial_state`` when given."""
    _check(fq, fk, v)
    if initial_state is not None and tuple(initial_state.shape) != (*fq.shape[:2], fq.shape[-1], v.shape[-1] + 1):
        raise ValueError(f"initial_state must be [B, H, K, V + 1], got {tuple(initial_state.shape)}")
    if resolve_backend(backend, fq.device, "linear_attention") == "triton":
        from .linear_triton import linear_attention_triton

        return linear_attention_triton(fq, fk, v, normalize=normalize, initial_state=initial_state)
    return linear_attention_torch(fq, fk, v, normalize=normalize, initial_state=initial_state)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    *,
    window: int = 64,
    terrace: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``o [B, H, T, V]`` of the hybrid layer: ``gamma``-weighted softmax over the recent window
    (terrace: own ``window``-block plus the previous one; else a sliding window) with the exact
    window maximum, plus linear attention over older keys, under one normaliser."""
    _check(fq, fk, v, q, k, gamma)
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if resolve_backend(backend, q.device, "hybrid_attention") == "triton":
        from .linear_triton import hybrid_attention_triton, hybrid_unsupported

        if backend == "auto" and hybrid_unsupported(window, q.dtype):  # CUDA, a form the kernel lacks
            return hybrid_attention_torch(q, k, v, fq, fk, gamma, window=window, terrace=terrace, scale=scale)
        return hybrid_attention_triton(q, k, v, fq, fk, gamma, window=window, terrace=terrace, scale=scale)
    return hybrid_attention_torch(q, k, v, fq, fk, gamma, window=window, terrace=terrace, scale=scale)


def _features(x: torch.Tensor) -> torch.Tensor:
    """Positive features ``[..., 2D]`` of ``x [..., D]`` (softmax of ``x`` and of ``-x``, Hedgehog's form)."""
    return torch.cat([x.softmax(-1), (-x).softmax(-1)], -1)


def _linear_cases(call: AttentionInputs) -> list[Case]:
    k, v = call.expanded

    def run(backend: str) -> Outputs:
        leaves = {"fq": leaf(_features(call.q)), "fk": leaf(_features(k)), "v": leaf(v)}
        function = linear_attention_reference if backend == REFERENCE else partial(linear_attention, backend=backend)
        out, state = function(leaves["fq"], leaves["fk"], leaves["v"])
        return {"out": out.detach(), "state": state.detach(), **gradients(out, leaves)}

    return [Case("normalised", run)]


def _hybrid_cases(call: AttentionInputs) -> list[Case]:
    k, v = call.expanded
    gamma = torch.full((call.q.shape[1],), 0.5, dtype=call.q.dtype, device=call.q.device)

    def run(backend: str) -> Outputs:
        leaves = {"q": leaf(call.q), "k": leaf(k), "v": leaf(v), "fq": leaf(_features(call.q)),
                  "fk": leaf(_features(k))}
        function = (hybrid_attention_reference if backend == REFERENCE
                    else partial(hybrid_attention, backend=backend))
        out = function(*leaves.values(), gamma, window=64, terrace=True, scale=call.scale)
        return {"out": out.detach(), **gradients(out, leaves)}

    return [Case("terraced window 64", run)]


register_op(Op("linear_attention", "causal linear attention and its final state", ("torch", "triton"),
               _linear_cases))
register_op(Op("hybrid_attention", "softmax over a recent window plus linear attention over older keys",
               ("torch", "triton"), _hybrid_cases))


__all__ = ["hybrid_attention", "linear_attention"]
