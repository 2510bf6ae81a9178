"""The edit kinds a plan can hold besides :class:`~headlab.surgeon.plan.HeadScale` (SPEC §2.3–2.8).

Parameters only: the tensor math is in :mod:`.edits`, per-request state (spans, frozen sink sets,
selected heads) in :mod:`.request`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .edits import DROP_FIRST, PASTA_POSITIONS, UNIFORM_ROWS
from .shape import ModelShape
from .plan import Edit, PlanError, register_edit
from .settings import Choice, Integer, Items, Maybe, Number, Switch, setting
from .search.settings import ACT_BETA, ACT_THRESHOLD

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

    beta: float = setting(ACT_BETA, "factor on the sink weights", kind=Number(0.0, 1.0))
    threshold: float = setting(ACT_THRESHOLD, "mean received attention above which a key is a sink",
                               kind=Number(0.0, 1.0))
    relative_c: float | None = setting(None, "sinks exceed relative_c / N instead", kind=Maybe(Number(0.0, low_open=True)))
    drop_first: str = setting("lowest", "which first sink is spared", kind=Choice(*DROP_FIRST))

    def validate(self, shape: ModelShape) -> None:
        super().validate(shape)
        if self.layer < FIRST_EDITABLE_LAYER:
            raise PlanError(f"calibrate edit on layer {self.layer}: layers 0-1 are never calibrated")


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


@register_edit
@dataclass(frozen=True)
class Steer(Edit):
    """PASTA: add ``log alpha`` to the logits of every prompt key outside the request's emphasised
    sections (generated keys untouched), on all rows of the chosen heads (:func:`.edits.pasta_bias`:
    ``position`` and ``per_section`` give the released code's other modes; the default biases the
    union of the sections once)."""

    kind: ClassVar[str] = "steer"
    stage: ClassVar[str] = "bias"

    alpha: float = setting(0.01, "factor on the attention of the keys the bias applies to",
                           kind=Number(0.0, 1e6, low_open=True))
    position: str = setting("exclude", "the release's scale_position", kind=Choice(*PASTA_POSITIONS))
    per_section: bool = setting(False, "bias once per emphasised section, as the release does", kind=Switch())


@register_edit
@dataclass(frozen=True)
class Uniform(Edit):
    """Zero the chosen heads' logits on every key their rows see, as a zeroed query does: uniform
    attention over the visible keys (a learned sink keeps its own logit). ``rows="decode"`` edits
    only calls that extend a cached sequence, leaving the prefill untouched: the retrieval-head
    masking intervention (Wu et al.'s harness zeroes the query in decode steps only)."""

    kind: ClassVar[str] = "uniform"
    stage: ClassVar[str] = "bias"
    needs_prompt: ClassVar[bool] = False

    rows: str = setting("decode", "'decode': calls after the prefill only; 'all': every row", kind=Choice(*UNIFORM_ROWS))

    def edits_call(self, prefill: bool) -> bool:
        """Whether a call (the prefill of a sequence, or a later one) has rows this edit changes."""
        return self.rows == "all" or not prefill


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


@register_edit
@dataclass(frozen=True)
class HeadMean(Edit):
    """Mean ablation: replace each chosen head's output with its dataset mean ``means
    [len(heads)][head_dim]`` (see :func:`headlab.surgeon.head_output_means`)."""

    kind: ClassVar[str] = "head_mean"
    stage: ClassVar[str] = "output"

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
