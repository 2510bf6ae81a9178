"""ACT's offline head search (docs/methods/act.md): calibrate one head at a time, keep the heads that help.

The heads are measured layer by layer from the residual stream entering their layer, kept from one
unedited pass (:class:`~.prefix.LayerPrefix`), without running the layers below the head again for
every head; on causal models with full-attention caches only each sequence's rows from the head's
first sink on run (:class:`~.suffix.SuffixScorer`), continuing the unedited cache, with the heads
of a layer side by side. The accuracies are those of evaluating each head's plan on its own (the
scores agree up to fp32 rounding).

Progress is written atomically after every head (the heads of a layer measured side by side, one
after another once the layer is done) to a JSON file; a search started again with the same settings
skips the heads already measured, so a killed search continues where it stopped.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from ...core.errors import InputFileError, UnsupportedModelError
from ...core.files import parse_json, write_json
from ...core.shape import model_shape
from ..conversion.converted import converted_layers
from ..edits.base import FIRST_EDITABLE_LAYER
from ..edits.calibrate import Calibrate
from ..hook import attach
from ..plan import Plan, PlanError
from .accuracy import EvalResult, accuracy, choice_batches, model_forward, score_batches
from .prefix import LayerPrefix
from .settings import ACT_BETA, ACT_THRESHOLD
from .suffix import SuffixScorer
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
    """Every head of ``layers`` (default ``2 … n_layers - 2``: the released layers 2-30 of 32,
    generalised, less any layer converted to linear attention, which has no sinks to calibrate)."""
    shape = model_shape(model)
    converted = converted_layers(model)
    if layers is None:
        layers = [layer for layer in range(FIRST_EDITABLE_LAYER, shape.n_layers - 1) if layer not in converted]
    bad = [layer for layer in layers if not FIRST_EDITABLE_LAYER <= layer < shape.n_layers or layer in converted]
    if bad:
        raise PlanError(f"layers {bad} cannot be calibrated: use {FIRST_EDITABLE_LAYER}..{shape.n_layers - 1}, "
                        "none converted to linear attention")
    return [(layer, head) for layer in layers for head in range(shape.n_heads)]


def calibration_search(model, tokenizer, examples: list[Example], settings: SearchSettings,
                       progress_path: str | os.PathLike, batch_size: int = 16, progress: bool = True) -> dict:
    """Measure accuracy with each candidate head calibrated alone; keep heads whose accuracy
    beats the unedited baseline by more than ``settings.margin``.

    Returns ``{"settings", "baseline", "heads": {"L,H": accuracy}, "kept": [[L, H], ...]}``; the
    same dict is kept (and resumed from) at ``progress_path``. ``progress``: a status line before the
    unedited pass and a bar over the heads, whose postfix names the layer's forward under way.
    """
    progress_path = Path(progress_path)
    state = _resume(progress_path, settings)
    batches = choice_batches(tokenizer, examples, batch_size)
    prefix = _prefix_or_none(model, batches)
    forward = prefix.forward if prefix is not None else model_forward(model)
    todo = sorted(c for c in settings.candidates if _key(c) not in state["heads"])
    if progress and (todo or state["baseline"] is None):
        sequences = sum(len(batch.rows) for batch in batches)
        tqdm.write(f"calibration search: unedited pass over {len(examples)} examples ({sequences} choice sequences "
                   f"in {len(batches)} batches)", file=sys.stderr)
    scorer = _scorer_or_none(model, batches, prefix, len(examples), progress) if todo else None
    if state["baseline"] is None:
        unedited = (scorer.unedited_scores() if scorer is not None
                    else score_batches(batches, len(examples), forward, progress))
        state["baseline"] = accuracy(examples, unedited).accuracy
        write_json(progress_path, state)
    bar = tqdm(desc="calibration search", initial=len(settings.candidates) - len(todo), total=len(settings.candidates),
               unit="head", disable=not progress)
    for layer in sorted({layer for layer, _ in todo}):
        bar.set_postfix_str(f"layer {layer}: the stream entering it")
        if prefix is not None and not _advanced(prefix, layer):
            prefix, forward, scorer = None, model_forward(model), None
        edits = [Calibrate(layer, (head,), beta=settings.beta, threshold=settings.threshold)
                 for candidate_layer, head in todo if candidate_layer == layer]
        status = bar.set_postfix_str if progress else None
        side_by_side = scorer is not None  # the layer's heads finish together: the bar moves once, by all of them
        for edit, result in measure_layer(model, examples, batches, edits, forward, scorer, status):
            state["heads"][_key((layer, edit.heads[0]))] = result.accuracy
            write_json(progress_path, state)
            if not side_by_side:
                bar.update()
        if side_by_side:
            bar.update(len(edits))
    bar.close()
    state["kept"] = [list(c) for c in settings.candidates
                     if state["heads"][_key(c)] - state["baseline"] > settings.margin]
    write_json(progress_path, state)
    return state


def measure_layer(model, examples: list[Example], batches, edits: list[Calibrate], forward,
                  scorer: SuffixScorer | None = None,
                  status: Callable[[str], None] | None = None) -> Iterator[tuple[Calibrate, EvalResult]]:
    """Accuracy under each of ``edits`` alone (one head each, one layer): all at once from the rows
    they can change with ``scorer``, else one by one with ``forward`` (the whole model, or from the
    kept stream of the layer). ``status`` hears each forward as it starts."""
    if scorer is not None:
        yield from zip(edits, (accuracy(examples, scores) for scores in scorer.layer_scores(edits, status)))
        return
    for edit in edits:
        head = f"layer {edit.layer} head {edit.heads[0]}"
        with attach(model, Plan([edit])):
            yield edit, accuracy(examples, score_batches(batches, len(examples), forward, status=(
                None if status is None else lambda text: status(f"{head}: {text}"))))


def _prefix_or_none(model, batches) -> LayerPrefix | None:
    try:
        return LayerPrefix(model, batches)
    except UnsupportedModelError as err:
        _slower(f"each head runs the whole model ({err})")
        return None


def _scorer_or_none(model, batches, prefix: LayerPrefix | None, n_examples: int,
                    progress: bool = False) -> SuffixScorer | None:
    if prefix is None:
        return None
    try:
        return SuffixScorer(model, batches, prefix, n_examples, progress=progress)
    except UnsupportedModelError as err:
        _slower(f"each head runs its sequences whole from the layer's kept input ({err})")
        return None


def _advanced(prefix: LayerPrefix, layer: int) -> bool:
    """Whether ``prefix`` now starts at ``layer`` (False: the model's blocks cannot be skipped)."""
    try:
        prefix.advance(layer)
    except UnsupportedModelError as err:
        _slower(f"from layer {layer} on, each head runs the whole model ({err})")
        return False
    return True


def _slower(how: str) -> None:
    """Say that the search takes a slower path (the same accuracies), and why."""
    warnings.warn(f"headlab: the calibration search takes a slower path: {how}", stacklevel=3)


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
        state = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, InputFileError) as err:
        raise PlanError(f"cannot resume from {path}: {err}; move it away to start afresh") from err
    if state.get("settings") != settings.to_dict():
        raise PlanError(f"{path} holds a search with other settings; move it away or use the same settings")
    return state
