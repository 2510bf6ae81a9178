"""Dispatch of the softmax-stage and output-stage edits of one layer call (SPEC §2.1 order).

Only the heads an edit names are computed in eager fp32 (their ``[B, h, Nq, Nk]`` map, formed as
the model forms it: :class:`~.attention_math.AttentionCall`); the other heads keep the model's
own output, so a few edited heads never build maps for the rest. Key sets frozen at prefill are
indexed by sequence position and read through :meth:`RequestState.in_call`, so sliding-window
caches (whose keys start later) see the same keys as a full recompute.
"""

from __future__ import annotations

import torch

from . import attention_math, edits
from .attention_math import AttentionCall
from .edit_kinds import Calibrate, HeadMean, Redistribute, Reinforce, Steer, Uniform
from .plan import Edit, HeadScale, PlanError
from .request import Request, RequestState


def softmax_stage_heads(bias: list[Edit], redistribute: list[Edit]) -> tuple[int, ...]:
    """Sorted union of the heads the pre- and post-softmax edits of a layer touch."""
    return tuple(sorted({h for e in (*bias, *redistribute) for h in e.heads}))


def edited_attention(
    layer: int,
    bias: list[Edit],
    redistribute: list[Edit],
    state: RequestState,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    call: AttentionCall,
    group_size: int,
) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """``(heads, probs [B, h, Nq, Nk], out [B, Nq, h, D])`` of the edited heads after bias ->
    softmax -> redistribution, in plan order within each stage."""
    heads = softmax_stage_heads(bias, redistribute)
    n_query, n_key = query.shape[-2], key.shape[-2]
    logits = attention_math.attention_logits(query, key, mask, call, heads, group_size)
    visible = logits > attention_math.MASKED / 2  # [B, h, Nq, Nk]
    for edit in bias:
        idx = [heads.index(h) for h in edit.heads]
        if isinstance(edit, Steer):
            logits[:, idx] = _steer(edit, state, logits[:, idx], call)
        elif isinstance(edit, Uniform):
            logits[:, idx] = edits.uniform_logits(logits[:, idx], visible[:, idx])
        else:
            raise PlanError(f"no bias rule for {edit.kind}")
    probs = attention_math.softmax_with_sinks(logits, None if call.sinks is None else call.sinks[list(heads)])
    rows = call.row_positions(n_query, n_key)
    for edit in redistribute:
        idx = [heads.index(h) for h in edit.heads]
        if isinstance(edit, Calibrate):
            probs[:, idx] = _calibrate(edit, layer, state, probs[:, idx], visible[:, idx], rows, call)
        elif isinstance(edit, Redistribute):
            probs[:, idx] = _redistribute(edit, layer, state, probs[:, idx], rows, call)
        else:
            raise PlanError(f"no redistribution rule for {edit.kind}")
    kv = attention_math.kv_heads_for(heads, group_size)
    out = torch.matmul(probs, value[:, kv].float()).to(value.dtype)
    return heads, probs, out.transpose(1, 2)


def _steer(edit: Steer, state: RequestState, logits: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    if state.emphasis is None:
        raise PlanError(f"steer edit on layer {edit.layer} needs Request(emphasis=...)")
    n_key = logits.shape[-1]
    emphasis = RequestState.in_call(state.emphasis, call.key_start, n_key).to(logits.device)
    prompt = RequestState.in_call(state.prompt_keys, call.key_start, n_key).to(logits.device)
    return edits.pasta_bias(logits, emphasis, prompt, edit.alpha, edit.position, edit.per_section)


def _calibrate(edit: Calibrate, layer, state, probs, visible, rows, call: AttentionCall) -> torch.Tensor:
    key = (layer, edit.heads)
    n_key = probs.shape[-1]
    if key not in state.act_sinks:  # prefill: find the sinks from this call's rows and freeze them
        if probs.shape[-2] != n_key or call.key_start:
            raise PlanError("ACT needs the prefill of the request before its decode rows")
        query_valid = state.prompt_keys
        scores = edits.mean_received(probs, visible, query_valid.to(probs.device))
        state.act_sinks[key] = edits.act_sink_set(
            scores, state.prompt_keys.to(probs.device), edit.threshold, edit.relative_c, edit.drop_first
        )[..., :state.n_prompt]
    sinks = RequestState.in_call(state.act_sinks[key], call.key_start, n_key)
    first_valid = state.prompt_keys.float().argmax(-1)  # [B]: position of the first real token
    protected = rows[None, :].to(probs.device) == first_valid[:, None]  # the first token's own row
    return edits.act_reweight(probs, sinks, visible, edit.beta, protected)


def _redistribute(edit: Redistribute, layer, state, probs, rows, call: AttentionCall) -> torch.Tensor:
    if state.span is None:
        raise PlanError(f"redistribute edit on layer {layer} needs Request(span=...)")
    n_key = probs.shape[-1]
    if layer not in state.var_sinks:
        hidden = state.pending_hidden.get(layer)
        if hidden is None or probs.shape[-2] != n_key or call.key_start:
            raise PlanError("VAR needs the prefill of the request (the residual stream entering the layer)")
        ratio = edits.sink_ratio(hidden[:, :state.n_prompt], list(edit.sink_dims))
        state.var_sinks[layer] = (ratio > edit.sink_threshold) & state.prompt_keys
    sinks = RequestState.in_call(state.var_sinks[layer], call.key_start, n_key)[:, None, :].to(probs.device)
    span = RequestState.in_call(state.span, call.key_start, n_key).to(probs.device)
    span_end = torch.where(state.span, torch.arange(state.span.shape[-1]), -1).amax(-1).to(probs.device)  # [B]
    editable = rows[None, :].to(probs.device) > span_end[:, None]  # after the span (and every decode row)
    return edits.var_redistribute(probs, sinks, span[:, None, :], editable, edit.keep_fraction,
                                  edit.span_mass_min, edit.sink_share_max)


def output_edits(layer: int, plan_edits: list[Edit], state: RequestState, request: Request,
                 out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Head scales, mean ablation and VHR on ``out [B, Nq, H, D]`` (``rows [Nq]``: key
    positions of the rows); scale factors multiply."""
    scales = torch.ones(out.shape[2], dtype=out.dtype, device=out.device)
    for edit in plan_edits:
        if isinstance(edit, HeadScale):
            scales[list(edit.heads)] *= edit.scale
    out = attention_math.scale_heads(out, scales)
    for edit in plan_edits:
        if isinstance(edit, HeadMean):
            out = out.clone()
            out[:, :, list(edit.heads)] = torch.tensor(edit.means, dtype=out.dtype, device=out.device)
        elif isinstance(edit, Reinforce):
            out = _reinforce(edit, layer, state, request, out, rows)
    return out


def _reinforce(edit: Reinforce, layer, state, request, out, rows) -> torch.Tensor:
    """Select at prefill (per sample, frozen), then scale the last prompt row and every later
    row."""
    candidates = list(edit.heads)
    n_prompt = state.n_prompt
    if n_prompt is None:
        raise PlanError(f"reinforce edit on layer {layer} needs the prefill of the request before its decode steps")
    if layer not in state.vhr_heads:
        reference = (request.reference or {}).get(layer)
        if reference is None or rows[-1] != n_prompt - 1:
            raise PlanError(f"reinforce edit on layer {layer} needs Request(reference=reference_outputs(...)) "
                            "and the prefill of the request")
        last = out[:, -1, candidates].float()  # [B, h, D]
        ref = reference[:, candidates].float().to(out.device)
        chosen = edits.vhr_select((last - ref).norm(dim=-1), ref.pow(2).sum(-1))
        selected = torch.zeros(out.shape[0], out.shape[2], dtype=torch.bool, device=out.device)
        selected[:, candidates] = chosen
        state.vhr_heads[layer] = selected
    factor = torch.where(state.vhr_heads[layer], edit.alpha, 1.0).to(out.dtype)  # [B, H]
    reinforced = (rows >= n_prompt - 1).to(out.device)  # [Nq]
    factors = torch.where(reinforced[None, :, None], factor[:, None, :], torch.ones_like(factor[:, None, :]))
    return out * factors[..., None]
