"""Edit plans: which (layer, head) pairs get which attention edits, serializable as JSON.

A plan is a list of edits. Each edit names one layer, the query heads it touches and its
parameters, and belongs to one stage of the attention function (see ARCHITECTURE.md):
``bias`` (pre-softmax), ``redistribute`` (mass-preserving, post-softmax) or ``output``
(per-head output scaling, before ``o_proj``). Edit kinds register themselves in ``EDIT_KINDS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .errors import PlanError
from .files import claim_file, write_json
from .shape import ModelShape

STAGES = ("bias", "redistribute", "output")


EDIT_KINDS: dict[str, type["Edit"]] = {}


def register_edit(cls: type["Edit"]) -> type["Edit"]:
    """Class decorator adding an edit kind to the JSON registry under ``cls.kind``."""
    EDIT_KINDS[cls.kind] = cls
    return cls


@dataclass(frozen=True)
class Edit:
    """Base of all edits: one layer, a tuple of query heads."""

    kind: ClassVar[str] = ""
    stage: ClassVar[str] = ""

    layer: int
    heads: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        if not self.heads:
            raise PlanError(f"{self.kind} edit on layer {self.layer} names no heads")
        if len(set(self.heads)) != len(self.heads):
            raise PlanError(f"{self.kind} edit on layer {self.layer} repeats a head: {self.heads}")

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

    def to_dict(self) -> dict:
        return {"kind": self.kind, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}}


@register_edit
@dataclass(frozen=True)
class HeadScale(Edit):
    """Multiply the chosen heads' outputs by ``scale`` before ``o_proj`` (0 ablates them)."""

    kind: ClassVar[str] = "head_scale"
    stage: ClassVar[str] = "output"

    scale: float = 1.0


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

    def layers(self) -> set[int]:
        """Layers with at least one edit."""
        return {e.layer for e in self.edits}

    def for_layer(self, layer: int, stage: str) -> list[Edit]:
        """The edits of one layer and stage, in plan order."""
        return [e for e in self.edits if e.layer == layer and e.stage == stage]

    def to_dict(self) -> dict:
        return {
            "format": "headlab-plan/1",
            "model": self.model,
            "shape": None if self.shape is None else self.shape.to_dict(),
            "edits": [e.to_dict() for e in self.edits],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != "headlab-plan/1":
            raise PlanError("not a headlab plan (expected a JSON object with format 'headlab-plan/1')")
        shape = ModelShape(**data["shape"]) if data.get("shape") else None
        return cls([_edit_from_dict(e) for e in data.get("edits", [])], data.get("model"), shape)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the plan as JSON (atomically); an existing file is replaced only when headlab wrote
        it, or with ``overwrite``."""
        claim_file(path, overwrite, "plan")
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise PlanError(f"cannot read plan {path}: {err}") from err
        return cls.from_dict(data)


def _edit_from_dict(data: dict) -> Edit:
    kind = data.get("kind")
    cls = EDIT_KINDS.get(kind)
    if cls is None:
        raise PlanError(f"unknown edit kind {kind!r}; known kinds: {sorted(EDIT_KINDS)}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names - {"kind"}
    if unknown:
        raise PlanError(f"{kind} edit has unknown field(s) {sorted(unknown)}; fields: {sorted(names)}")
    try:
        return cls(**{k: v for k, v in data.items() if k != "kind"})
    except TypeError as err:
        raise PlanError(f"bad {kind} edit {data}: {err}") from err
