"""Public entry points: attention with interpretability statistics, without the N×N map.

``backend`` as in :mod:`._backend`: the fused kernels of :mod:`.attention_stats_triton` or the chunked
torch path of :mod:`.attention_stats_torch`. Shapes and conventions: :mod:`.reference`.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from .attention_stats_torch import attention_stats_torch, column_stats_torch
from .ops import REFERENCE, AttentionInputs, Case, Op, Outputs, register_op
from .quirks import check_scoring
from .reference import attention_stats_reference, column_stats_reference
from .types import AttentionStats, ColumnStats

MAX_TOPK = 8


def _check(q, k, v, key_valid, key_groups, topk):
    if q.dim() != 4 or k.dim() != 4 or (v is not None and v.dim() != 4):
        raise ValueError("q must be [B, Hq, Nq, D] and k, v [B, Hkv, Nk, D]")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    if key_valid is not None and tuple(key_valid.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_valid must be [B, Nk] = {(k.shape[0], k.shape[2])}")
    if key_groups is not None and (key_groups.dim() != 3 or tuple(key_groups.shape[::2]) != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_groups must be [B, G, Nk] with B={k.shape[0]}, Nk={k.shape[2]}")
    if not 0 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be between 0 and {MAX_TOPK}, got {topk}")


def _defaults(q, k, scale, q_offset) -> tuple[float, int]:
    """``scale`` defaults to ``D^-1/2``; ``q_offset`` to ``Nk - Nq`` (rows at the end of the cache)."""
    return (q.shape[-1] ** -0.5 if scale is None else float(scale),
            k.shape[2] - q.shape[2] if q_offset is None else int(q_offset))


def attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    key_valid: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    topk: int = 0,
    columns: bool = False,
    query_valid: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
) -> AttentionStats:
    """Attention output plus, per row, log-sum-exp, entropy, mass on ``key_groups`` and the
    top-``topk`` keys, at the memory cost of one attention pass.

    ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]`` (GQA: query head h reads KV head h // g);
    ``q_offset`` places row i at key position ``i + q_offset`` (default ``Nk - Nq``, i.e. decode
    rows at the end of the cache); ``key_valid [B, Nk]`` masks padded keys; ``key_groups [B, G, Nk]``
    marks column sets (sinks, a needle span, an image span). With ``columns`` the result also
    holds :class:`ColumnStats` over the rows marked in ``query_valid [B, Nq]`` (default all): the
    torch path sums them in the same pass, the Triton path in :func:`column_stats`' second pass.
    Family quirks (:mod:`.quirks`): ``window`` keys per causal row (sliding-window layers),
    ``softcap`` (``c·tanh(s/c)`` logits), ``sinks [Hq]`` learned sink logits (then ``lse`` and
    ``entropy`` cover the sink column too, and key probabilities sum to ``1 - p_sink``).
    Forward only: the results carry no gradient.
    """
    _check(q, k, v, key_valid, key_groups, topk)
    check_scoring(window, softcap, sinks, causal, q.shape[1])
    scale, q_offset = _defaults(q, k, scale, q_offset)
    quirks = dict(window=window, softcap=softcap)
    if resolve_backend(backend, q.device, "attention_with_stats") == "triton":
        from .attention_stats_triton import attention_stats_triton, column_stats_triton

        stats = attention_stats_triton(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                       key_valid=key_valid, key_groups=key_groups, topk=topk, sinks=sinks, **quirks)
        if columns:
            stats.columns = column_stats_triton(q, k, stats.lse, scale=scale, causal=causal, q_offset=q_offset,
                                                key_valid=key_valid, query_valid=query_valid, **quirks)
        return stats
    return attention_stats_torch(q, k, v, scale=scale, causal=causal, q_offset=q_offset, key_valid=key_valid,
                                 key_groups=key_groups, topk=topk, columns=columns, query_valid=query_valid,
                                 sinks=sinks, **quirks)


def column_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> ColumnStats:
    """Second pass reusing ``lse [B, Hq, Nq]`` from :func:`attention_with_stats`: attention each
    key receives summed over valid rows (``query_valid [B, Nq]``), and how many valid rows see it.
    ``window`` and ``softcap`` as there; learned sinks need nothing here (they are in ``lse``)."""
    _check(q, k, None, key_valid, None, 0)
    check_scoring(window, softcap, None, causal, q.shape[1])
    scale, q_offset = _defaults(q, k, scale, q_offset)
    if resolve_backend(backend, q.device, "column_stats") == "triton":
        from .attention_stats_triton import column_stats_triton

        return column_stats_triton(q, k, lse, scale=scale, causal=causal, q_offset=q_offset,
                                   key_valid=key_valid, query_valid=query_valid, window=window, softcap=softcap)
    return column_stats_torch(q, k, lse, scale=scale, causal=causal, q_offset=q_offset,
                              key_valid=key_valid, query_valid=query_valid, window=window, softcap=softcap)


def _first_token_group(call: AttentionInputs) -> torch.Tensor:
    """``[B, 1, N]``: the first key as the one column group (a sink)."""
    groups = torch.zeros(call.k.shape[0], 1, call.k.shape[2], dtype=torch.bool, device=call.k.device)
    groups[..., 0] = True
    return groups


def _statistics_cases(call: AttentionInputs) -> list[Case]:
    kwargs = dict(scale=call.scale, window=call.window, softcap=call.softcap, sinks=call.sinks,
                  key_groups=_first_token_group(call), topk=4)

    def run(backend: str) -> Outputs:
        if backend == REFERENCE:
            stats = attention_stats_reference(call.q, call.k, call.v, **kwargs)
        else:
            stats = attention_with_stats(call.q, call.k, call.v, backend=backend, **kwargs)
        return {"out": stats.out, "lse": stats.lse, "entropy": stats.entropy, "group_mass": stats.group_mass,
                "topk_weight": stats.topk_weight}

    return [Case("causal rows", run)]


def _column_cases(call: AttentionInputs) -> list[Case]:
    quirks = dict(scale=call.scale, window=call.window, softcap=call.softcap)
    lse = attention_stats_reference(call.q, call.k, call.v, sinks=call.sinks, **quirks).lse

    def run(backend: str) -> Outputs:
        if backend == REFERENCE:
            return {"col_sum": column_stats_reference(call.q, call.k, sinks=call.sinks, **quirks).col_sum}
        return {"col_sum": column_stats(call.q, call.k, lse, backend=backend, **quirks).col_sum}

    return [Case("causal rows", run)]


register_op(Op("attention_with_stats", "attention output with per-row LSE, entropy, group mass and top-k keys",
               ("torch", "triton"), _statistics_cases))
register_op(Op("column_stats", "attention each key receives, from the rows' LSE", ("torch", "triton"),
               _column_cases))


__all__ = ["MAX_TOPK", "attention_with_stats", "column_stats"]
