"""What an edit kind is: the base class every kind extends, the registry the plan files and the hook
find kinds in, and the view of one layer call an edit's ``apply`` receives.

An edit kind is one class (the built-in ones each have a module of this package): its parameters as dataclass
fields with help and checked ranges, its ``stage`` in the attention function (``bias`` on the
logits before the softmax, ``reweight`` on the probabilities after it (mass-preserving), ``output`` on the
per-head outputs before ``o_proj``), what it needs (``needs_prompt``: the prompt's keys and the
request's spans fixed at prefill; ``needs_residual``: the residual stream entering the layer at
prefill; ``on_bridge``: it runs on a TransformerLens bridge, which offers only head outputs), and
``apply``, which calls the pure tensor functions of :mod:`.formulas`. State an edit fixes at prefill
(sink sets, chosen heads) lives under the edit's own key in :class:`~..request.RequestState`.
Registering the class with :func:`register_edit` is all the hook, plan files and bridge need.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

from ...core.errors import PlanError
from ...core.kinds import Integer, Items
from ...core.settings import check_settings, setting
from ...core.shape import ModelShape

if TYPE_CHECKING:
    import torch

    from ..attention_math import AttentionCall
    from ..request import Request, RequestState

STAGES = ("bias", "reweight", "output")
FIRST_EDITABLE_LAYER = 2  # ACT and VAR never edit layers 0-1
EDIT_KINDS: dict[str, type["Edit"]] = {}


def register_edit(cls: type["Edit"]) -> type["Edit"]:
    """Class decorator: make ``cls`` a kind plans can hold and the hook can run, under ``cls.kind``."""
    if cls.stage not in STAGES:
        raise ValueError(f"edit kind {cls.kind!r} declares stage {cls.stage!r}; stages are {STAGES}")
    if cls.kind in EDIT_KINDS and EDIT_KINDS[cls.kind] is not cls:
        raise ValueError(f"edit kind {cls.kind!r} is registered already (by {EDIT_KINDS[cls.kind].__qualname__})")
    EDIT_KINDS[cls.kind] = cls
    return cls


@dataclass
class EditCall:
    """One layer call as an edit sees it.

    ``rows [Nq]``: sequence positions of the call's query rows. Softmax stages also get ``call``
    (scaling, window, soft-cap, sinks, where the keys start) and ``visible [B, h, Nq, Nk]`` (True
    where a row sees a key) for the edit's ``h`` heads.
    """

    layer: int
    state: "RequestState"
    request: "Request"
    rows: "torch.Tensor"
    call: "AttentionCall | None" = None
    visible: "torch.Tensor | None" = None

    def keys(self, mask: "torch.Tensor") -> "torch.Tensor":
        """A ``[..., N0]`` key mask fixed at prefill, for this call's keys (sliding-window caches
        start later; generated keys are False)."""
        from ..request import RequestState

        n_key = self.visible.shape[-1]
        return RequestState.in_call(mask, self.call.key_start, n_key).to(self.visible.device)


@dataclass(frozen=True)
class Edit:
    """Base of all edit kinds: one layer and a tuple of query heads (see the module docstring).

    ``apply(x, at)`` returns the edited ``x``: the logits (``bias``) or probabilities
    (``reweight``) ``[B, h, Nq, Nk]`` of the edit's heads, or the per-head outputs
    ``[B, Nq, H, D]`` of every head (``output``)."""

    kind: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    needs_prompt: ClassVar[bool] = False
    needs_residual: ClassVar[bool] = False
    on_bridge: ClassVar[bool] = False

    layer: int = setting(help="the layer edited", kind=Integer())
    heads: tuple[int, ...] = setting(help="the query heads edited (distinct)", kind=Items(Integer(), min_items=0))

    def __post_init__(self):
        check_settings(self, PlanError)  # types here; indices against the model in validate()
        if not self.heads:
            raise PlanError(f"{self.kind} edit on layer {self.layer} names no heads")

    @classmethod
    def example(cls, shape: ModelShape) -> "Edit":
        """The plainest valid edit of this kind on a model of ``shape``: every query head of the first
        layer the built-in kinds may edit, the parameters at their defaults (the contract tests run it on
        tiny models of several families). A kind with parameters that have no default overrides it."""
        return cls(layer=min(FIRST_EDITABLE_LAYER, shape.n_layers - 1), heads=tuple(range(shape.n_heads)))

    def validate(self, shape: ModelShape) -> None:
        """Raise :class:`PlanError` if the edit does not fit a model of ``shape``."""
        if not 0 <= self.layer < shape.n_layers:
            raise PlanError(
                f"{self.kind} edit names layer {self.layer}, but the model has layers 0..{shape.n_layers - 1}"
            )
        bad = [h for h in self.heads if not 0 <= h < shape.n_heads]
        if bad:
            raise PlanError(
                f"{self.kind} edit on layer {self.layer} names head(s) {bad}, but the model has "
                f"query heads 0..{shape.n_heads - 1}"
            )

    def validate_residual(self, hidden_size: int) -> None:
        """For a kind that reads the residual stream (``needs_residual``): raise :class:`PlanError` if the
        edit does not fit a residual stream of ``hidden_size`` dimensions. Nothing by default."""

    def kept_keys(self, at: EditCall, n_key: int) -> "torch.Tensor | None":
        """For a bias-stage edit that only hides keys: ``[B, Nq, Nk]``, True where a row keeps a key
        (the hook then runs the model's own attention under the narrowed mask instead of recomputing
        the heads in fp32). None (the default) for an edit that changes logits otherwise."""
        return None

    @property
    def compensates(self) -> bool:
        """Whether the keys this (bias-stage) edit hides from a row come back as one compensation
        token: their mean key and value, weighted by their count (RazorAttention)."""
        return False

    def edits_call(self, prefill: bool) -> bool:
        """Whether a call (the prefill of a sequence, or a later one) has rows this edit changes."""
        return True

    def apply(self, x: "torch.Tensor", at: EditCall) -> "torch.Tensor":
        """The edited tensor (see the class docstring)."""
        raise NotImplementedError(f"edit kind {self.kind!r} has no apply")

    def affine(self, scale: "torch.Tensor", shift: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor] | None":
        """For an output-stage edit that maps each head's output ``x`` to ``a·x + c`` at every position:
        the map ``(scale [H], shift [H, D])`` (every head's ``x ↦ scale·x + shift`` so far) followed by
        this edit, so that it can be folded into the output projection's weights
        (:mod:`~headlab.surgeon.folding`). None (the default): the edit is not such a map."""
        return None

    def state_key(self) -> tuple:
        """The key of what this edit fixes at prefill in :class:`~..request.RequestState`."""
        return (self.kind, self.layer, self.heads)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}}


__all__ = ["EDIT_KINDS", "FIRST_EDITABLE_LAYER", "Edit", "EditCall", "STAGES", "register_edit"]
