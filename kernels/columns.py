"""Public entry points: attention restricted to a few key columns, normalised by a known log-sum-exp.

With the LSE of a fused pass, the mass ``A_G = Σ_{j∈G} a_j`` and partial output
``P_G = Σ_{j∈G} a_j v_j`` of a small key set ``G`` (sinks, a span) cost O(Nq·|G|·D): this is what
the mass-preserving edits need to correct an output without the N×N map (docs/methods/statistics.md);
the weights rows give the keys a few positions back are what the pattern scores need. Both ops have a
torch path only (:mod:`.columns_torch`): gathering a few columns is no work a fused kernel
would save on a GPU. Shapes: ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]``, ``lse [B, Hq, Nq]`` (natural
log); quirks (``window``, ``softcap``) as in :mod:`.quirks`. Specification: :mod:`.reference`.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from .columns_torch import partial_attention_torch, row_key_probs_torch
from .ops import REFERENCE, AttentionInputs, Case, Op, Outputs, register_op
from .quirks import check_scoring
from .reference import attention_stats_reference, partial_attention_reference, row_key_probs_reference


def _check(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, window, softcap, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [B, Hq, Nq, D] and k [B, Hkv, Nk, D] with the same B and D, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [B, Hq, Nq] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    check_scoring(window, softcap, None, causal, q.shape[1])


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mass [B, Hq, Nq], out [B, Hq, Nq, D])`` over the keys ``key_index [B, S]`` (int64, -1 for
    unused slots; repeated indices count once each, so pass each key once), in fp32 (fp64 for fp64
    inputs). A row sees key j when ``not causal`` or ``j <= i + q_offset`` (default ``Nk - Nq``), and
    ``j > i + q_offset - window`` with a sliding window. Rows with ``lse = -inf`` (no visible key) get
    zeros."""
    _check(q, k, lse, window, softcap, causal)
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if key_index.dim() != 2 or key_index.shape[0] != q.shape[0]:
        raise ValueError(f"key_index must be [B, S] with B={q.shape[0]}, got {tuple(key_index.shape)}")
    if (key_index >= k.shape[2]).any():
        raise ValueError(f"key_index names keys beyond the {k.shape[2]} keys")
    resolve_backend(backend, q.device, "partial_attention", has_triton=False)
    return partial_attention_torch(q, k, v, lse, key_index, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                   causal=causal, q_offset=k.shape[2] - q.shape[2] if q_offset is None else q_offset,
                                   window=window, softcap=softcap)


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
    backend: str = "auto",
) -> torch.Tensor:
    """``[B, Hq, Nq, len(offsets)]``: the weight row ``i`` gives key ``i + q_offset - d`` for each
    offset ``d ≥ 0`` (``d = 1``: the previous token), from the rows' LSE in O(Nq·D) per offset;
    0 where that key does not exist, is padded (``key_valid [B, Nk]``) or lies outside a sliding
    ``window`` (``d >= window``), or the row sees nothing."""
    _check(q, k, lse, window, softcap, True)
    if any(d < 0 for d in offsets):
        raise ValueError(f"offsets must be ≥ 0 (causal rows see no later key), got {offsets}")
    resolve_backend(backend, q.device, "row_key_probs", has_triton=False)
    return row_key_probs_torch(q, k, lse, tuple(offsets), scale=q.shape[-1] ** -0.5 if scale is None else scale,
                               q_offset=k.shape[2] - q.shape[2] if q_offset is None else q_offset,
                               key_valid=key_valid, window=window, softcap=softcap)


def _key_index(call: AttentionInputs) -> torch.Tensor:
    """``[B, 3]``: the first key, the middle one and the last one of every sequence."""
    n = call.k.shape[2]
    return torch.tensor([[0, n // 2, n - 1]] * call.k.shape[0], device=call.k.device)


def _partial_cases(call: AttentionInputs) -> list[Case]:
    quirks = dict(scale=call.scale, window=call.window, softcap=call.softcap)
    lse = attention_stats_reference(call.q, call.k, call.v, sinks=call.sinks, **quirks).lse
    index = _key_index(call)

    def run(backend: str) -> Outputs:
        if backend == REFERENCE:
            mass, out = partial_attention_reference(call.q, call.k, call.v, lse, index, **quirks)
        else:
            mass, out = partial_attention(call.q, call.k, call.v, lse, index, backend=backend, **quirks)
        return {"mass": mass, "out": out}

    return [Case("first, middle and last key", run)]


def _row_key_cases(call: AttentionInputs) -> list[Case]:
    quirks = dict(scale=call.scale, window=call.window, softcap=call.softcap)
    lse = attention_stats_reference(call.q, call.k, call.v, sinks=call.sinks, **quirks).lse

    def run(backend: str) -> Outputs:
        if backend == REFERENCE:
            return {"probs": row_key_probs_reference(call.q, call.k, lse, (0, 1, 2), **quirks)}
        return {"probs": row_key_probs(call.q, call.k, lse, (0, 1, 2), backend=backend, **quirks)}

    return [Case("offsets 0, 1, 2", run)]


register_op(Op("partial_attention", "mass and output over a few key columns, from the rows' LSE", ("torch",),
               _partial_cases))
register_op(Op("row_key_probs", "the weight each row gives the keys a few positions back, from the rows' LSE",
               ("torch",), _row_key_cases))


__all__ = ["partial_attention", "row_key_probs"]
