"""The built-in edit kinds: each class holds its parameters, its stage and needs, and ``apply``, which
calls the tensor math of :mod:`.edits` (:mod:`.edit` says what a kind is). Shapes: softmax stages
edit ``[B, h, Nq, Nk]`` over the edit's heads; output edits ``[B, Nq, H, D]`` over every head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import edits
from .edit import Edit, EditCall, register_edit
from .edits import DROP_FIRST, PASTA_POSITIONS, UNIFORM_ROWS
from ..core.errors import PlanError
from .request import RequestState
from .search.settings import ACT_BETA, ACT_THRESHOLD, STREAM_SINKS, STREAM_WINDOW
from ..core.kinds import Choice, Integer, Items, Maybe, Number, Switch
from ..core.settings import setting
from ..core.shape import ModelShape

FIRST_EDITABLE_LAYER = 2  # ACT and VAR never edit layers 0-1


@register_edit
@dataclass(frozen=True)
class Calibrate(Edit):
    """ACT: scale the weights of each head's attention sinks by ``beta`` and give the freed mass
    to the other visible keys in proportion. Sinks: keys whose mean received attention at
    prefill exceeds ``threshold`` (or ``relative_c / N`` when set), minus the first one as
    ``drop_first`` says; frozen for decode rows."""

    kind: ClassVar[str] = "calibrate"
    stage: ClassVar[str] = "redistribute"
    needs_prompt: ClassVar[bool] = True

    beta: float = setting(ACT_BETA, "factor on the sink weights", kind=Number(0.0, 1.0))
    threshold: float = setting(ACT_THRESHOLD, "mean received attention above which a key is a sink",
                               kind=Number(0.0, 1.0))
    relative_c: float | None = setting(None, "sinks exceed relative_c / N instead", kind=Maybe(Number(0.0, low_open=True)))
    drop_first: str = setting("lowest", "which first sink is spared", kind=Choice(*DROP_FIRST))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if self.layer < FIRST_EDITABLE_LAYER:
            raise PlanError(f"calibrate edit on layer {self.layer}: layers 0-1 are never calibrated")

    def apply(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        """Find the sinks from the prefill's rows (frozen for later calls), then reweight."""
        state = at.state
        sinks = state.frozen_for(self, lambda: self._sinks(probs, at))
        first_valid = state.prompt_keys.float().argmax(-1)  # [B]: position of the first real token
        protected = at.rows[None, :].to(probs.device) == first_valid[:, None]  # the first token's own row
        return edits.act_reweight(probs, at.keys(sinks), at.visible, self.beta, protected)

    def _sinks(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        if probs.shape[-2] != probs.shape[-1] or at.call.key_start:
            raise PlanError("ACT needs the prefill of the request before its decode rows")
        prompt = at.state.prompt_keys.to(probs.device)
        scores = edits.mean_received(probs, at.visible, prompt)
        return edits.act_sink_set(scores, prompt, self.threshold, self.relative_c,
                                  self.drop_first)[..., :at.state.n_prompt]


@register_edit
@dataclass(frozen=True)
class Redistribute(Edit):
    """VAR: on rows whose mass on the request's span is at least ``span_mass_min`` and whose
    sink share of it is at most ``sink_share_max``, keep ``keep_fraction`` of every sink weight
    and move the rest to the span's non-sink keys in proportion. Sink tokens: ``φ > sink_threshold``
    on the residual stream entering the layer, over ``sink_dims`` (see
    :func:`headlab.surgeon.detect_sink_dimensions`), found at prefill and frozen."""

    kind: ClassVar[str] = "redistribute"
    stage: ClassVar[str] = "redistribute"
    needs_prompt: ClassVar[bool] = True
    needs_residual: ClassVar[bool] = True

    sink_dims: tuple[int, ...] = setting((), "residual-stream dimensions that mark sink tokens",
                                         kind=Items(Integer(0), min_items=0))
    keep_fraction: float = setting(0.6, "fraction of each sink weight kept", kind=Number(0.0, 1.0))
    span_mass_min: float = setting(0.2, "rows with at least this mass on the span are edited", kind=Number(0.0, 1.0))
    sink_share_max: float = setting(0.5, "... and at most this share of it on sinks", kind=Number(0.0, 1.0))
    sink_threshold: float = setting(20.0, "a token is a sink when max |x_d| / RMS(x) exceeds this", kind=Number(0.0))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if not FIRST_EDITABLE_LAYER <= self.layer <= shape.n_layers - 2:
            raise PlanError(
                f"redistribute edit on layer {self.layer}: VAR edits layers {FIRST_EDITABLE_LAYER}.."
                f"{shape.n_layers - 2} (never 0-1 or the last layer)"
            )
        if not self.sink_dims:
            raise PlanError("redistribute edit needs sink_dims (detect them with detect_sink_dimensions)")

    def apply(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        """Sink tokens from the prefill's residual stream (frozen), then move sink mass to the span on
        the rows after it."""
        state = at.state
        if state.span is None:
            raise PlanError(f"redistribute edit on layer {self.layer} needs Request(span=...)")
        sinks = at.keys(state.frozen_for(self, lambda: self._sink_tokens(probs, at)))[:, None, :]
        span = at.keys(state.span)
        span_end = torch.where(state.span, torch.arange(state.span.shape[-1]), -1).amax(-1).to(probs.device)  # [B]
        editable = at.rows[None, :].to(probs.device) > span_end[:, None]  # after the span (and every decode row)
        return edits.var_redistribute(probs, sinks, span[:, None, :], editable, self.keep_fraction,
                                      self.span_mass_min, self.sink_share_max)

    def _sink_tokens(self, probs: torch.Tensor, at: EditCall) -> torch.Tensor:
        hidden = at.state.residual.get(self.layer)
        if hidden is None or probs.shape[-2] != probs.shape[-1] or at.call.key_start:
            raise PlanError("VAR needs the prefill of the request (the residual stream entering the layer)")
        ratio = edits.sink_ratio(hidden[:, :at.state.n_prompt], list(self.sink_dims))
        return (ratio > self.sink_threshold) & at.state.prompt_keys


@register_edit
@dataclass(frozen=True)
class Steer(Edit):
    """PASTA: add ``log alpha`` to the logits of every prompt key outside the request's emphasised
    sections (generated keys untouched), on all rows of the chosen heads (:func:`.edits.pasta_bias`:
    ``position`` and ``per_section`` give the released code's other modes; the default biases the
    union of the sections once)."""

    kind: ClassVar[str] = "steer"
    stage: ClassVar[str] = "bias"
    needs_prompt: ClassVar[bool] = True

    alpha: float = setting(0.01, "factor on the attention of the keys the bias applies to",
                           kind=Number(0.0, 1e6, low_open=True))
    position: str = setting("exclude", "the release's scale_position", kind=Choice(*PASTA_POSITIONS))
    per_section: bool = setting(False, "bias once per emphasised section, as the release does", kind=Switch())

    def apply(self, logits: torch.Tensor, at: EditCall) -> torch.Tensor:
        if at.state.emphasis is None:
            raise PlanError(f"steer edit on layer {self.layer} needs Request(emphasis=...)")
        return edits.pasta_bias(logits, at.keys(at.state.emphasis), at.keys(at.state.prompt_keys), self.alpha,
                                self.position, self.per_section)


@register_edit
@dataclass(frozen=True)
class Uniform(Edit):
    """Zero the chosen heads' logits on every key their rows see, as a zeroed query does: uniform
    attention over the visible keys (a learned sink keeps its own logit). ``rows="decode"`` edits
    only calls that extend a cached sequence, leaving the prefill untouched: the retrieval-head
    masking intervention (Wu et al.'s harness zeroes the query in decode steps only)."""

    kind: ClassVar[str] = "uniform"
    stage: ClassVar[str] = "bias"

    rows: str = setting("decode", "'decode': calls after the prefill only; 'all': every row", kind=Choice(*UNIFORM_ROWS))

    def edits_call(self, prefill: bool) -> bool:
        """Whether a call (the prefill of a sequence, or a later one) has rows this edit changes."""
        return self.rows == "all" or not prefill

    def apply(self, logits: torch.Tensor, at: EditCall) -> torch.Tensor:
        return edits.uniform_logits(logits, at.visible)


@register_edit
@dataclass(frozen=True)
class Stream(Edit):
    """A streaming head (RazorAttention, DuoAttention): every row sees only the sequence's first
    ``sinks`` valid tokens and the ``window`` latest positions up to itself, at prefill and in
    decoding; with ``compensate``, also RazorAttention's compensation token (the mean key and value
    of the keys it no longer sees, weighted by their count). The policy is per KV head: ``heads``
    must hold every query head of each KV head they touch, so that KV head's cache needs only those
    entries."""

    kind: ClassVar[str] = "stream"
    stage: ClassVar[str] = "bias"
    needs_prompt: ClassVar[bool] = True

    sinks: int = setting(STREAM_SINKS, "first valid tokens every row keeps (attention sinks)", kind=Integer(0))
    window: int = setting(STREAM_WINDOW, "latest positions every row keeps, itself included", kind=Integer(1))
    compensate: bool = setting(False, "the hidden keys come back as one compensation token (RazorAttention)",
                               kind=Switch())

    @property
    def compensates(self) -> bool:
        return self.compensate

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        group = shape.group_size
        partial = sorted({h // group for h in self.heads if any(g not in self.heads for g in
                                                                range(h // group * group, (h // group + 1) * group))})
        if partial:
            raise PlanError(f"stream edit on layer {self.layer}: KV head(s) {partial} stream only if all their query "
                            f"heads do (each KV head serves {group} query heads)")

    def apply(self, logits: torch.Tensor, at: EditCall) -> torch.Tensor:
        keep = self._keep(at, logits.shape[-1]).to(logits.device)
        return logits.masked_fill(~keep[:, None], torch.finfo(torch.float32).min)

    def kept_keys(self, at: EditCall, n_key: int) -> torch.Tensor | None:
        return None if self.compensate else self._keep(at, n_key)

    def _keep(self, at: EditCall, n_key: int) -> torch.Tensor:
        """``[B, Nq, Nk]``: the sinks (each row's first valid tokens) and the window."""
        valid = at.state.prompt_keys  # [B, N0]
        first = valid & (valid.cumsum(-1) <= self.sinks)
        key_positions = at.call.key_start + torch.arange(n_key)
        return edits.streaming_keep(RequestState.in_call(first, at.call.key_start, n_key), key_positions, at.rows,
                                    self.window)


@register_edit
@dataclass(frozen=True)
class Reinforce(Edit):
    """VHR: among the candidate ``heads``, multiply by ``alpha`` the outputs of the heads whose
    divergence between the request with and without its span is above the layer median (after
    outlier removal), chosen at prefill per sample and frozen; prefill scales the last prompt
    row, decode every row. Needs the request's reference outputs
    (:func:`headlab.surgeon.reference_outputs`)."""

    kind: ClassVar[str] = "reinforce"
    stage: ClassVar[str] = "output"

    alpha: float = setting(2.0, "factor on the selected heads' outputs", kind=Number(0.0, 1000.0))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if len(self.heads) < 2:
            raise PlanError("reinforce edit needs at least two candidate heads (it keeps those above the median)")

    def apply(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        """Select at prefill (per sample, frozen), then scale the last prompt row and every later row."""
        n_prompt = at.state.n_prompt
        if n_prompt is None:
            raise PlanError(f"reinforce edit on layer {self.layer} needs the prefill of the request before its "
                            "decode steps")
        selected = at.state.frozen_for(self, lambda: self._select(out, at))  # [B, H]
        factor = torch.where(selected, self.alpha, 1.0).to(out.dtype)
        reinforced = (at.rows >= n_prompt - 1).to(out.device)  # [Nq]
        factors = torch.where(reinforced[None, :, None], factor[:, None, :], torch.ones_like(factor[:, None, :]))
        return out * factors[..., None]

    def _select(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        reference = (at.request.reference or {}).get(self.layer)
        if reference is None or at.rows[-1] != at.state.n_prompt - 1:
            raise PlanError(f"reinforce edit on layer {self.layer} needs Request(reference=reference_outputs(...)) "
                            "and the prefill of the request")
        candidates = list(self.heads)
        last = out[:, -1, candidates].float()  # [B, h, D]
        ref = reference[:, candidates].float().to(out.device)
        selected = torch.zeros(out.shape[0], out.shape[2], dtype=torch.bool, device=out.device)
        selected[:, candidates] = edits.vhr_select((last - ref).norm(dim=-1), ref.pow(2).sum(-1))
        return selected


@register_edit
@dataclass(frozen=True)
class HeadMean(Edit):
    """Mean ablation: replace each chosen head's output with its dataset mean ``means
    [len(heads)][head_dim]`` (see :func:`headlab.surgeon.head_output_means`)."""

    kind: ClassVar[str] = "head_mean"
    stage: ClassVar[str] = "output"
    on_bridge: ClassVar[bool] = True

    means: tuple[tuple[float, ...], ...] = setting((), "each head's mean output", kind=Items(Items(Number(), unique=False,
                                                                                                   min_items=1),
                                                                                             unique=False, min_items=0))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if len(self.means) != len(self.heads) or any(len(row) != shape.head_dim for row in self.means):
            raise PlanError(
                f"head_mean edit on layer {self.layer}: means must be {len(self.heads)} rows of "
                f"head_dim={shape.head_dim} values"
            )

    def apply(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        out = out.clone()
        out[:, :, list(self.heads)] = torch.tensor(self.means, dtype=out.dtype, device=out.device)
        return out


@register_edit
@dataclass(frozen=True)
class HeadScale(Edit):
    """Multiply the chosen heads' outputs by ``scale`` before ``o_proj`` (0 ablates them)."""

    kind: ClassVar[str] = "head_scale"
    stage: ClassVar[str] = "output"
    on_bridge: ClassVar[bool] = True

    scale: float = setting(1.0, "factor on the heads' outputs (0 ablates; at most 1000 in size)",
                           kind=Number(-1000.0, 1000.0))

    def apply(self, out: torch.Tensor, at: EditCall) -> torch.Tensor:
        scales = torch.ones(out.shape[2], dtype=out.dtype, device=out.device)
        scales[list(self.heads)] = self.scale
        return out * scales[None, None, :, None]


__all__ = ["FIRST_EDITABLE_LAYER", "Calibrate", "HeadMean", "HeadScale", "Redistribute", "Reinforce", "Steer", "Stream",
           "Uniform"]
