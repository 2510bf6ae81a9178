"""ACT's offline head search (docs/methods/act.md): calibrate one head at a time, keep the heads that help.

The heads are measured layer by layer from the residual stream entering their layer, kept from one
unedited pass (:class:`~.prefix.LayerPrefix`): the same accuracies as evaluating each head's plan
on its own, without running the layers below the head again for every head.

Progress is written atomically after every head to a JSON file; a search started again with the
same settings skips the heads already measured, so a killed search continues where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..edit_kinds import FIRST_EDITABLE_LAYER, Calibrate
from ..errors import UnsupportedModelError
from ..files import write_json
from ..hook import apply
from ..shape import model_shape
from ..plan import Plan, PlanError
from .evaluate import EvalResult, accuracy, choice_batches, model_forward, score_batches
from .prefix import LayerPrefix
from .settings import ACT_BETA, ACT_THRESHOLD
from .tasks import Example


@dataclass(frozen=True)
class SearchSettings:
    """What a search measured with; a progress file is only resumed under the same settings."""

    tasks: tuple[str, ...]
    n_examples: int
    candidates: tuple[tuple[int, int], ...]
    beta: float = ACT_BETA
    threshold: float = ACT_THRESHOLD
    margin: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["candidates"] = [list(c) for c in self.candidates]
        data["tasks"] = list(self.tasks)
        return data


def default_candidates(model, layers: list[int] | None = None) -> list[tuple[int, int]]:
    """Every head of ``layers`` (default ``2 … n_layers - 2``: the released layers 2-30 of 32, generalised)."""
    shape = model_shape(model)
    layers = list(range(FIRST_EDITABLE_LAYER, shape.n_layers - 1)) if layers is None else layers
    bad = [layer for layer in layers if not FIRST_EDITABLE_LAYER <= layer < shape.n_layers]
    if bad:
        raise PlanError(f"layers {bad} cannot be calibrated: use {FIRST_EDITABLE_LAYER}..{shape.n_layers - 1}")
    return [(layer, head) for layer in layers for head in range(shape.n_heads)]


def calibration_search(model, tokenizer, examples: list[Example], settings: SearchSettings,
                       progress_path: str | os.PathLike, batch_size: int = 16) -> dict:
    """Measure accuracy with each candidate head calibrated alone; keep heads whose accuracy
    beats the unedited baseline by more than ``settings.margin``.

    Returns ``{"settings", "baseline", "heads": {"L,H": accuracy}, "kept": [[L, H], ...]}``; the
    same dict is kept (and resumed from) at ``progress_path``.
    """
    progress_path = Path(progress_path)
    state = _resume(progress_path, settings)
    batches = choice_batches(tokenizer, examples, batch_size)
    prefix = _prefix_or_none(model, batches)
    forward = prefix.forward if prefix is not None else model_forward(model)
    if state["baseline"] is None:
        state["baseline"] = accuracy(examples, score_batches(batches, len(examples), forward)).accuracy
        write_json(progress_path, state)
    todo = sorted(c for c in settings.candidates if _key(c) not in state["heads"])
    for layer, head in tqdm(todo, desc="calibration search", initial=len(settings.candidates) - len(todo),
                            total=len(settings.candidates)):
        if prefix is not None and not _advanced(prefix, layer):
            prefix, forward = None, model_forward(model)
        plan = Plan([Calibrate(layer, (head,), beta=settings.beta, threshold=settings.threshold)])
        state["heads"][_key((layer, head))] = measure_head(model, examples, batches, plan, forward).accuracy
        write_json(progress_path, state)
    state["kept"] = [list(c) for c in settings.candidates
                     if state["heads"][_key(c)] - state["baseline"] > settings.margin]
    write_json(progress_path, state)
    return state


def measure_head(model, examples: list[Example], batches, plan: Plan, forward) -> EvalResult:
    """Accuracy under ``plan`` with ``forward`` (the whole model, or from the kept stream of the plan's layer)."""
    with apply(model, plan):
        return accuracy(examples, score_batches(batches, len(examples), forward))


def _prefix_or_none(model, batches) -> LayerPrefix | None:
    try:
        return LayerPrefix(model, batches)
    except UnsupportedModelError:
        return None  # every head then runs the whole model


def _advanced(prefix: LayerPrefix, layer: int) -> bool:
    """Whether ``prefix`` now starts at ``layer`` (False: the model's blocks cannot be skipped)."""
    try:
        prefix.advance(layer)
    except UnsupportedModelError:
        return False
    return True


def plan_from_search(model, model_id: str, state: dict, beta: float, threshold: float) -> Plan:
    """One :class:`Calibrate` edit per layer over the kept heads."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in state["kept"]:
        by_layer.setdefault(layer, []).append(head)
    edits = [Calibrate(layer, tuple(heads), beta=beta, threshold=threshold) for layer, heads in sorted(by_layer.items())]
    return Plan(edits, model_id, model_shape(model))


def _key(candidate) -> str:
    return f"{candidate[0]},{candidate[1]}"


def _resume(path: Path, settings: SearchSettings) -> dict:
    fresh = {"format": "headlab-act-search/1", "settings": settings.to_dict(), "baseline": None, "heads": {}, "kept": []}
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"cannot resume from {path}: {err}; move it away to start afresh") from err
    if state.get("settings") != settings.to_dict():
        raise PlanError(f"{path} holds a search with other settings; move it away or use the same settings")
    return state
