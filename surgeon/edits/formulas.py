"""The attention edits as pure functions on tensors (docs/methods: act, var, pasta, vhr); the edit kinds call them.

Shapes: probabilities ``a [B, h, Nq, Nk]`` fp32 for the ``h`` edited heads; ``visible [B, 1 or h,
Nq, Nk]`` bool; key sets (sinks, spans) ``[B, h or 1, Nk]`` bool; per-head outputs ``z [B, N, H, D]``.
Every redistribution here keeps each row's sum and leaves rows it does not select untouched.
"""

from __future__ import annotations

import math

import torch

from ..search.settings import ACT_THRESHOLD

DROP_FIRST = ("lowest", "position0", "none")
_TINY = 1e-6
REST_MIN = 1e-12  # ACT leaves a row alone when its non-sink mass is at most this (nothing to give the mass to)


# --- ACT: attention calibration -------------------------------------------------------


def mean_received(a: torch.Tensor, visible: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
    """Sink score ``[B, h, Nk]``: attention each key receives, averaged over the valid rows that
    see it (``query_valid [B, Nq]``); 0 for keys no valid row sees."""
    rows = query_valid[:, None, :, None]
    seen = (visible & rows).expand_as(a)
    total = torch.where(seen, a, torch.zeros_like(a)).sum(2)
    count = seen.sum(2)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def act_sink_set(
    scores: torch.Tensor,
    key_valid: torch.Tensor,
    threshold: float = ACT_THRESHOLD,
    relative_c: float | None = None,
    drop_first: str = "lowest",
) -> torch.Tensor:
    """Sink set ``[B, h, Nk]`` bool: keys whose score exceeds ``threshold`` (or ``relative_c / N``
    with N the number of valid keys), minus the first sink as ``drop_first`` says.

    ``"lowest"`` drops the lowest-index sink; ``"position0"`` drops the first valid key if it is a
    sink; ``"none"`` keeps all.
    """
    if drop_first not in DROP_FIRST:
        raise ValueError(f"drop_first must be one of {DROP_FIRST}, got {drop_first!r}")
    if relative_c is not None:
        n_valid = key_valid.sum(-1).clamp_min(1)[:, None, None].float()
        sinks = scores > relative_c / n_valid
    else:
        sinks = scores > threshold
    sinks = sinks & key_valid[:, None, :]
    if drop_first == "none":
        return sinks
    positions = torch.arange(sinks.shape[-1], device=sinks.device)
    if drop_first == "lowest":
        first = torch.where(sinks, positions, sinks.shape[-1]).amin(-1, keepdim=True)  # [B, h, 1]
    else:
        first = torch.where(key_valid, positions, sinks.shape[-1]).amin(-1)[:, None, None]
    return sinks & (positions != first)


def act_reweight(a: torch.Tensor, sinks: torch.Tensor, visible: torch.Tensor, beta: float,
                 protected_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Scale sink weights by ``beta`` and give the freed mass to the other visible keys in
    proportion: ``a' = β a`` on S, ``a (r + (1 - β) m) / r`` elsewhere, with ``m`` the row's sink
    mass and ``r`` its directly summed non-sink mass (equal to ``(1 - β m) / (1 - m)`` when the row
    sums to one, but without the cancellation of ``1 - m`` when the sinks hold nearly all of it,
    and mass-preserving under a learned sink column, whose share is untouched).

    Rows with ``m = 0`` or ``r <= REST_MIN`` and ``protected_rows [B, Nq]`` (the first token at
    prefill) are unchanged.
    """
    in_sink = sinks[:, :, None, :] & visible
    zeros = torch.zeros_like(a)
    m = torch.where(in_sink, a, zeros).sum(-1, keepdim=True)  # [B, h, Nq, 1]
    rest = torch.where(visible & ~in_sink, a, zeros).sum(-1, keepdim=True)
    edit = (m > 0) & (rest > REST_MIN)
    if protected_rows is not None:
        edit = edit & ~protected_rows[:, None, :, None]
    gamma = (rest + (1 - beta) * m) / rest.clamp_min(REST_MIN)
    factor = torch.where(in_sink, torch.full_like(a, beta), gamma.expand_as(a))
    return torch.where(edit, a * factor, a)


# --- VAR: sink redistribution to a span ---------------------------------------------------


def sink_ratio(hidden: torch.Tensor, sink_dims: list[int]) -> torch.Tensor:
    """``φ(x) = max_{d ∈ D} |x_d| / RMS(x)`` for hidden states ``[B, N, d_model]`` -> ``[B, N]``."""
    rms = hidden.float().pow(2).mean(-1).add(1e-6).sqrt()
    return hidden[..., list(sink_dims)].float().abs().amax(-1) / rms


def var_redistribute(
    a: torch.Tensor,
    sinks: torch.Tensor,
    span: torch.Tensor,
    rows: torch.Tensor,
    keep_fraction: float = 0.6,
    span_mass_min: float = 0.2,
    sink_share_max: float = 0.5,
) -> torch.Tensor:
    """VAR on the rows it selects.

    ``sinks, span [B, 1, Nk]`` bool (sink tokens; target span I); ``rows [B, Nq]`` the rows that
    may be edited (after the span at prefill, every decode row). As in the released code, a batch
    element with no sink token inside its span is left alone (the release skips the layer). A row
    is edited when its span mass ``M ≥ span_mass_min`` and the sinks' share of it
    ``π ≤ sink_share_max``: every sink weight is multiplied by ``keep_fraction`` and the removed
    mass goes to the span's non-sink keys in proportion. Rows whose span has no non-sink weight
    are unchanged.
    """
    zeros = torch.zeros_like(a)
    span_mass = torch.where(span[:, :, None, :], a, zeros).sum(-1, keepdim=True)
    span_sinks = torch.where((span & sinks)[:, :, None, :], a, zeros).sum(-1, keepdim=True)
    sink_mass = torch.where(sinks[:, :, None, :], a, zeros).sum(-1, keepdim=True)
    receivers = (span & ~sinks)[:, :, None, :]
    receiver_mass = torch.where(receivers, a, zeros).sum(-1, keepdim=True)
    share = span_sinks / span_mass.clamp_min(_TINY)
    chosen = (span_mass >= span_mass_min) & (share <= sink_share_max) & (receiver_mass > _TINY)
    span_has_sink = (span & sinks).any(-1)  # [B, 1]
    chosen = chosen & rows[:, None, :, None] & span_has_sink[:, :, None, None]
    budget = (1 - keep_fraction) * sink_mass
    edited = torch.where(sinks[:, :, None, :], a * keep_fraction, a)
    edited = torch.where(receivers, a * (1 + budget / receiver_mass.clamp_min(_TINY)), edited)
    return torch.where(chosen, edited, a)


# --- PASTA: attention steering ---------------------------------------------------------


PASTA_POSITIONS = ("exclude", "include", "generation")


def pasta_bias(logits: torch.Tensor, sections: torch.Tensor, prompt: torch.Tensor, alpha: float,
               position: str = "exclude", per_section: bool = False) -> torch.Tensor:
    """PASTA's bias on the logits of every row, in multiples of ``log alpha`` per prompt column.

    ``logits [B, h, Nq, Nk]`` (masked); ``sections [B, S, Nk]`` bool, the emphasised sections;
    ``prompt [B, Nk]`` bool (generated keys are not in it and get no bias). ``position`` is the
    released code's ``scale_position``: ``exclude`` biases the prompt columns outside the emphasis,
    ``include`` biases the emphasis and then every prompt column once the other way, and
    ``generation`` biases every prompt column. headlab's default treats the sections as one union
    (each column biased at most once); ``per_section`` applies the bias once per section as the
    release does (a column outside two sections gets ``2 log alpha``). Both give the same softmax
    over prompt columns, so prefill rows agree; on decode rows the per-section form moves more
    mass to the generated keys. ``alpha = 1`` adds exactly 0.
    """
    if alpha <= 0:
        raise ValueError(f"PASTA alpha must be positive, got {alpha}")
    if position not in PASTA_POSITIONS:
        raise ValueError(f"PASTA position must be one of {PASTA_POSITIONS}, got {position!r}")
    inside = sections & prompt[:, None, :]  # [B, S, Nk]
    if not per_section:
        inside = inside.any(1, keepdim=True)
    n_sections = inside.shape[1]
    if position == "exclude":
        count = (prompt[:, None, :] & ~inside).sum(1)
    elif position == "include":
        count = inside.sum(1) - prompt.long()
    else:
        count = prompt.long() * n_sections
    return logits + (math.log(alpha) * count.to(logits.dtype))[:, None, None, :]


# --- uniform attention (retrieval-head masking) -------------------------------------------------


UNIFORM_ROWS = ("decode", "all")


def uniform_logits(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """``logits [B, h, Nq, Nk]`` replaced by 0 where ``visible`` (the masked entries keep their
    value): what a zero query gives, so the softmax is uniform over the keys a row sees."""
    return torch.where(visible, torch.zeros((), dtype=logits.dtype, device=logits.device), logits)


def streaming_keep(sink_keys: torch.Tensor, key_positions: torch.Tensor, rows: torch.Tensor,
                   window: int) -> torch.Tensor:
    """``[B, Nq, Nk]``: what a streaming head's row at sequence position ``rows [Nq]`` keeps: the
    sink keys ``sink_keys [B, Nk]`` and the keys at positions ``key_positions [Nk]`` within ``window``
    of it (itself included)."""
    recent = key_positions[None, :] > rows[:, None] - window  # [Nq, Nk]
    return sink_keys[:, None, :] | recent[None]


# --- VHR: head reinforcement -------------------------------------------------------------


def vhr_select(divergence: torch.Tensor, reference_energy: torch.Tensor) -> torch.Tensor:
    """Heads to reinforce ``[B, H]`` bool from the divergence ``VHD [B, H]`` and the no-span
    output energy ``TA = ‖z‖² [B, H]`` of one layer: zero VHD where both exceed their mean +
    std over the layer's heads, then keep heads strictly above the median."""
    def above(x):
        return x > (x.mean(-1, keepdim=True) + x.std(-1, keepdim=True))

    cleaned = torch.where(above(divergence) & above(reference_energy), torch.zeros_like(divergence), divergence)
    return cleaned > cleaned.median(-1, keepdim=True).values


# --- the LSE form of the mass-preserving edits ---------------------------------------


def act_output_from_lse(out: torch.Tensor, group_out: torch.Tensor, group_mass: torch.Tensor, beta: float) -> torch.Tensor:
    """ACT applied to an attention output without the map: ``o' = γ (o - P) + β P`` with
    ``γ = (1 - β A_S) / (1 - A_S)``.

    ``out, group_out [..., D]``: the row output and ``P = Σ_{j∈S} a_j v_j``; ``group_mass [...]``
    the row's sink mass ``A_S`` (both from :func:`headlab.kernels.columns` with the LSE
    of the fused pass). Rows with ``A_S = 0`` or ``1 - A_S <= REST_MIN`` are unchanged, as in
    :func:`act_reweight`. Without the map, the non-sink mass is ``1 - A_S``: in fp32 it keeps about
    ``6e-8 / (1 - A_S)`` relative precision (0.2 % at ``1 - A_S = 3e-5``), so pass fp64 tensors
    for rows whose sinks hold nearly all the mass, or use :func:`act_reweight` on the map.
    """
    m = group_mass[..., None]
    gamma = (1 - beta * m) / (1 - m).clamp_min(REST_MIN)
    edited = gamma * (out - group_out) + beta * group_out
    return torch.where((m > 0) & (1 - m > REST_MIN), edited, out)
