"""Running a layer call's edits, stage by stage, through each edit's ``apply`` (no kind is named here).

Only the heads the softmax-stage edits name are computed in eager fp32 (their ``[B, h, Nq, Nk]``
map, formed as the model forms it: :class:`~.attention_math.AttentionCall`); the other heads keep
the model's own output, so a few edited heads never build maps for the rest. Within a stage, edits
run in plan order. Key sets frozen at prefill are indexed by sequence position and read through
:meth:`~.edit.EditCall.keys`, so sliding-window caches (whose keys start later) see the same keys
as a full recompute.
"""

from __future__ import annotations

import torch

from . import attention_math
from .attention_math import AttentionCall
from .edit import Edit, EditCall
from .request import Request, RequestState


def softmax_stage_heads(bias: list[Edit], redistribute: list[Edit]) -> tuple[int, ...]:
    """Sorted union of the heads the pre- and post-softmax edits of a layer touch."""
    return tuple(sorted({h for e in (*bias, *redistribute) for h in e.heads}))


def edited_attention(
    layer: int,
    bias: list[Edit],
    redistribute: list[Edit],
    state: RequestState,
    request: Request,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    call: AttentionCall,
    group_size: int,
) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """``(heads, probs [B, h, Nq, Nk], out [B, Nq, h, D])`` of the edited heads after bias ->
    softmax -> redistribution."""
    heads = softmax_stage_heads(bias, redistribute)
    logits = attention_math.attention_logits(query, key, mask, call, heads, group_size)
    visible = logits > attention_math.MASKED / 2  # [B, h, Nq, Nk]
    rows = call.row_positions(query.shape[-2], key.shape[-2])
    for edit in bias:
        idx = [heads.index(h) for h in edit.heads]
        logits[:, idx] = edit.apply(logits[:, idx], EditCall(layer, state, request, rows, call, visible[:, idx]))
    probs = attention_math.softmax_with_sinks(logits, None if call.sinks is None else call.sinks[list(heads)])
    for edit in redistribute:
        idx = [heads.index(h) for h in edit.heads]
        probs[:, idx] = edit.apply(probs[:, idx], EditCall(layer, state, request, rows, call, visible[:, idx]))
    out = attention_math.per_kv_head_matmul(probs, value.float(), heads, group_size).to(value.dtype)
    return heads, probs, out.transpose(1, 2)


def output_edits(layer: int, plan_edits: list[Edit], state: RequestState, request: Request,
                 out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The output-stage edits on ``out [B, Nq, H, D]`` in plan order (``rows [Nq]``: sequence
    positions of the rows)."""
    at = EditCall(layer, state, request, rows)
    for edit in plan_edits:
        out = edit.apply(out, at)
    return out
