"""Running a layer call's edits, stage by stage, through each edit's ``apply`` (no kind is named here).

Only the heads the softmax-stage edits name are computed in eager fp32 (their ``[B, h, Nq, Nk]``
map, formed as the model forms it: :class:`~..attention_math.AttentionCall`); the other heads keep
the model's own output, so a few edited heads never build maps for the rest. Within a stage, edits
run in plan order. Key sets frozen at prefill are indexed by sequence position and read through
:meth:`~.base.EditCall.keys`, so sliding-window caches (whose keys start later) see the same keys
as a full recompute.
"""

from __future__ import annotations

import torch

from ...core.errors import PlanError
from .. import attention_math
from ..attention_math import AttentionCall
from ..request import Request, RequestState
from .base import Edit, EditCall


def softmax_stage_heads(bias: list[Edit], reweight: list[Edit]) -> tuple[int, ...]:
    """Sorted union of the heads the pre- and post-softmax edits of a layer touch."""
    return tuple(sorted({h for e in (*bias, *reweight) for h in e.heads}))


def edited_attention(
    layer: int,
    bias: list[Edit],
    reweight: list[Edit],
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
    softmax -> reweighting. A bias edit that :attr:`~.base.Edit.compensates` adds one key column
    per row (its compensation token) to the softmax; its probability is not in ``probs`` (rows then
    sum to less than one) but its value is in ``out``."""
    heads = softmax_stage_heads(bias, reweight)
    logits = attention_math.attention_logits(query, key, mask, call, heads, group_size)
    visible = logits > attention_math.MASKED / 2  # [B, h, Nq, Nk]
    rows = call.row_positions(query.shape[-2], key.shape[-2])
    compensated = torch.zeros(logits.shape[:3] + (1,), dtype=logits.dtype, device=logits.device).fill_(
        attention_math.MASKED)  # [B, h, Nq, 1]: the compensation tokens' logits (none: masked)
    compensation_values = None
    for edit in bias:
        idx = [heads.index(h) for h in edit.heads]
        before = logits[:, idx] > attention_math.MASKED / 2
        logits[:, idx] = edit.apply(logits[:, idx], EditCall(layer, state, request, rows, call, visible[:, idx]))
        if edit.compensates:
            _refuse_reweighting(edit, reweight)
            hidden = before & (logits[:, idx] <= attention_math.MASKED / 2)
            logit, mean_value = attention_math.compensation_token(query, key, value, hidden, call, edit.heads, group_size)
            compensated[:, idx] = logit
            if compensation_values is None:
                compensation_values = logits.new_zeros(*logits.shape[:3], value.shape[-1])
            compensation_values[:, idx] = mean_value
    if compensation_values is not None:
        logits = torch.cat([logits, compensated], dim=-1)
    probs = attention_math.softmax_with_sinks(logits, None if call.sinks is None else call.sinks[list(heads)])
    out_extra = None
    if compensation_values is not None:
        out_extra, probs = probs[..., -1:] * compensation_values, probs[..., :-1]
    for edit in reweight:
        idx = [heads.index(h) for h in edit.heads]
        probs[:, idx] = edit.apply(probs[:, idx], EditCall(layer, state, request, rows, call, visible[:, idx]))
    out = attention_math.per_kv_head_matmul(probs, value.float(), heads, group_size)
    if out_extra is not None:
        out = out + out_extra
    return heads, probs, out.to(value.dtype).transpose(1, 2)


def _refuse_reweighting(edit: Edit, reweight: list[Edit]) -> None:
    """A compensation token is outside the keys a reweighting moves mass between."""
    clash = sorted(set(edit.heads) & {h for other in reweight for h in other.heads})
    if clash:
        raise PlanError(f"layer {edit.layer}: heads {clash} have a compensation token and a post-softmax edit; "
                        "the two cannot be combined")


STREAM_BLOCK = 256  # query rows per call of the blocked attention


def kept_keys(layer: int, bias: list[Edit], state: RequestState, request: Request, call: AttentionCall,
              n_query: int, n_key: int) -> list[tuple[tuple[int, ...], torch.Tensor]] | None:
    """``[(heads, keep [B, Nq, Nk])]`` per bias edit: where the edit's heads' rows keep a key, when
    every bias edit of the call only hides keys (:meth:`~.base.Edit.kept_keys`); else None."""
    if not bias or len({h for edit in bias for h in edit.heads}) != sum(len(edit.heads) for edit in bias):
        return None  # none, or two edits on one head: the general path
    at = EditCall(layer, state, request, call.row_positions(n_query, n_key), call)
    kept = [(edit.heads, edit.kept_keys(at, n_key)) for edit in bias]
    return None if any(keep is None for _, keep in kept) else kept


def attention_with_kept_keys(own, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             mask: torch.Tensor | None, kwargs: dict, call: AttentionCall,
                             kept: list[tuple[tuple[int, ...], torch.Tensor]], group_size: int) -> torch.Tensor:
    """The model's own attention ``[B, Nq, H, D]`` with each edit's heads keeping only their kept
    keys: the other heads in one call under the layer's mask, each edit's heads in blocks of
    :data:`STREAM_BLOCK` rows over the union of the keys those rows keep (a streaming head's block
    reads its sinks and about two windows, not the whole prefix). Heads come in whole KV groups."""
    batch, n_heads, n_query, _ = query.shape
    out = query.new_empty(batch, n_query, n_heads, value.shape[-1])
    edited = {h for heads, _ in kept for h in heads}
    others = [h for h in range(n_heads) if h not in edited]
    if others:
        out[:, :, others] = _own_heads(own, module, query, key, value, mask, kwargs, others, group_size)
    for heads, keep in kept:
        out[:, :, list(heads)] = torch.cat([
            _kept_block(own, module, query, key, value, mask, kwargs, call, list(heads), keep, start, group_size)
            for start in range(0, n_query, STREAM_BLOCK)], dim=1)
    return out


def _own_heads(own, module, query, key, value, mask, kwargs, heads: list[int], group_size: int) -> torch.Tensor:
    """The model's attention of ``heads`` (whole KV groups) alone: ``[B, Nq, len(heads), D]``."""
    kv = sorted(set(attention_math.kv_heads_for(heads, group_size)))
    return own(module, query[:, heads], key[:, kv], value[:, kv], mask, **kwargs)[0]


def _kept_block(own, module, query, key, value, mask, kwargs, call: AttentionCall, heads: list[int],
                keep: torch.Tensor, start: int, group_size: int) -> torch.Tensor:
    """Rows ``start … start + STREAM_BLOCK`` of ``heads`` over the keys some of them keep."""
    n_query, n_key = query.shape[-2], key.shape[-2]
    stop = min(start + STREAM_BLOCK, n_query)
    rows_keep = keep[:, start:stop].to(query.device)  # [B, b, Nk]
    columns = rows_keep.any(0).any(0).nonzero()[:, 0]
    if mask is None:
        base = attention_math.visibility(1, stop - start, n_key, call.is_causal, n_key - n_query + start, None,
                                         query.device, call.window)
    else:
        base = mask[..., start:stop, :n_key]
    narrowed = attention_math.narrowed_mask(base[..., columns], rows_keep[:, None][..., columns], stop - start,
                                            len(columns), call.is_causal, call.window)
    kv = sorted(set(attention_math.kv_heads_for(heads, group_size)))
    return own(module, query[:, heads, start:stop], key[:, kv][:, :, columns], value[:, kv][:, :, columns], narrowed,
               **kwargs)[0]


def kept_mask(kept: list[tuple[tuple[int, ...], torch.Tensor]], n_heads: int) -> torch.Tensor:
    """``[B, H, Nq, Nk]``: the kept keys of :func:`kept_keys` for every head (unedited heads keep all)."""
    first = kept[0][1]
    out = first.new_ones(first.shape[0], n_heads, *first.shape[1:])
    for heads, keep in kept:
        out[:, list(heads)] = keep[:, None]
    return out


def output_edits(layer: int, plan_edits: list[Edit], state: RequestState, request: Request,
                 out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The output-stage edits on ``out [B, Nq, H, D]`` in plan order (``rows [Nq]``: sequence
    positions of the rows)."""
    at = EditCall(layer, state, request, rows)
    for edit in plan_edits:
        out = edit.apply(out, at)
    return out
