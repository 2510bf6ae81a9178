"""Edit plans: which (layer, head) pairs get which attention edits, serializable as JSON.

A plan is a list of edits. Each edit names one layer, the query heads it touches and its
parameters, and belongs to one stage of the attention function (see ARCHITECTURE.md):
``bias`` (pre-softmax), ``reweight`` (mass-preserving, post-softmax) or ``output``
(per-head output scaling, before ``o_proj``). Edit kinds are classes registered in
:data:`~.edits.base.EDIT_KINDS` (:mod:`.edits.base`); importing this module costs no torch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import MISSING, dataclass, field, fields
from importlib import import_module
from pathlib import Path

from ..core.errors import HeadlabError, InputFileError, PlanError
from ..core.files import claim_file, parse_json, read_text_file, write_json
from ..core.kinds import Integer, Items, Kind, Maybe, Text
from ..core.settings import check_object
from ..core.shape import ModelShape, model_shape
from .edits.base import EDIT_KINDS, Edit


@dataclass
class Plan:
    """An ordered list of edits, optionally bound to a model id and shape."""

    edits: list[Edit] = field(default_factory=list)
    model: str | None = None
    shape: ModelShape | None = None

    def __post_init__(self):
        if self.shape is not None:
            self.validate(self.shape)

    def validate(self, shape: ModelShape) -> None:
        """Raise :class:`PlanError` unless every edit fits a model of ``shape``."""
        if self.shape is not None and self.shape != shape:
            raise PlanError(
                f"this plan was made for a model of shape {self.shape.to_dict()} "
                f"({self.model or 'unnamed'}), not {shape.to_dict()}"
            )
        for edit in self.edits:
            edit.validate(shape)

    def then(self, other: "Plan | None") -> "Plan":
        """This plan's edits followed by ``other``'s, bound to this plan's model and shape (or
        ``other``'s where this one records none)."""
        if other is None:
            return self
        if self.shape is not None and other.shape is not None and self.shape != other.shape:
            raise PlanError(f"cannot join a plan for shape {other.shape.to_dict()} ({other.model or 'unnamed'}) to "
                            f"one for {self.shape.to_dict()} ({self.model or 'unnamed'})")
        return Plan(self.edits + other.edits, self.model or other.model, self.shape or other.shape)

    def layers(self) -> set[int]:
        """Layers with at least one edit."""
        return {e.layer for e in self.edits}

    def for_layer(self, layer: int, stage: str, prefill: bool | None = None) -> list[Edit]:
        """The edits of one layer and stage, in plan order; with ``prefill`` given, only those that
        change a call of that kind (:meth:`Edit.edits_call`)."""
        return [e for e in self.edits if e.layer == layer and e.stage == stage
                and (prefill is None or e.edits_call(prefill))]

    def to_dict(self) -> dict:
        return {
            "format": "headlab-plan/1",
            "model": self.model,
            "shape": None if self.shape is None else self.shape.to_dict(),
            "edits": [e.to_dict() for e in self.edits],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> "Plan":
        """The plan of :meth:`to_dict`'s JSON; :class:`PlanError` naming ``source`` for anything else
        (unknown keys or kinds, wrong types, non-finite or out-of-range values)."""
        if not isinstance(data, dict) or data.get("format") != "headlab-plan/1":
            raise PlanError(f"{source} is not a headlab plan (expected a JSON object with format 'headlab-plan/1')")
        try:
            plan = check_object(data, source, {"format": Text(), "edits": Items(Kind(), unique=False, min_items=0)},
                                {"model": Maybe(Text()), "shape": Maybe(_ShapeKind())})
        except HeadlabError as err:
            raise PlanError(str(err)) from None
        shape = ModelShape(**plan["shape"]) if plan.get("shape") else None
        edits = [_edit_from_dict(item, f"{source}: edit {i}") for i, item in enumerate(plan["edits"])]
        return cls(edits, plan.get("model"), shape)

    def bound_to(self, model) -> "Plan":
        """This plan recording ``model``'s name and shape (checked against the edits and any shape it
        records already)."""
        shape = model_shape(model)
        self.validate(shape)
        return Plan(list(self.edits), str(getattr(model, "name_or_path", "") or self.model or "") or None, shape)

    def save(self, path: str | os.PathLike, overwrite: bool = False, model=None) -> Path:
        """Write the plan as JSON (atomically); an existing file is replaced only when headlab wrote
        it, or with ``overwrite``. ``model``: the model the plan is for, whose name and shape the file
        records (:meth:`bound_to`), so that loading it for another model is refused; a plan that
        records no shape warns."""
        plan = self if model is None else self.bound_to(model)
        if plan.shape is None:
            warnings.warn(f"plan {path} records no model or shape, so nothing checks the model it is used on; "
                          "save(path, model=model) records them", stacklevel=2)
        claim_file(path, overwrite, "plan")
        return write_json(path, plan.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save`."""
        try:
            data = parse_json(read_text_file(path, "plan"), f"cannot read plan {path}:")
        except InputFileError as err:
            raise PlanError(str(err)) from None
        return cls.from_dict(data, f"plan {path}")


def _edit_from_dict(data, where: str) -> Edit:
    import_module(".edits", __package__)  # the built-in kinds register themselves on import
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    cls = EDIT_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PlanError(f"{where}: unknown edit kind {kind!r}; known kinds: {sorted(EDIT_KINDS)}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names - {"kind"}
    if unknown:
        raise PlanError(f"{where}: {kind} edit has unknown field(s) {sorted(unknown)}; fields: {sorted(names)}")
    missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING
                     and f.default_factory is MISSING)
    if missing:
        raise PlanError(f"{where}: {kind} edit lacks field(s) {missing}")
    try:
        return cls(**{k: v for k, v in data.items() if k != "kind"})
    except PlanError as err:
        raise PlanError(f"{where}: {err}") from None


class _ShapeKind(Kind):
    """A model shape object: four positive integers."""

    def check(self, value):
        return check_object(value, "shape", {name: Integer(1) for name in ("n_layers", "n_heads", "n_kv_heads",
                                                                            "head_dim")})
