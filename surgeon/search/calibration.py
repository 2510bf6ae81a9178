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

import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from ...core.errors import InputFileError, UnsupportedModelError
from ...core.journal import Journal
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
    return candidates_of(model_shape(model), set(converted_layers(model)), layers)


def candidates_of(shape, converted: set[int], layers: list[int] | None = None) -> list[tuple[int, int]]:
    """:func:`default_candidates` of a model of ``shape`` whose ``converted`` layers are linear (from its
    config, before any weight is read)."""
    if layers is None:
        layers = [layer for layer in range(FIRST_EDITABLE_LAYER, shape.n_layers - 1) if layer not in converted]
    bad = [layer for layer in layers if not FIRST_EDITABLE_LAYER <= layer < shape.n_layers or layer in converted]
    if bad:
        raise PlanError(f"layers {bad} cannot be calibrated: use {FIRST_EDITABLE_LAYER}..{shape.n_layers - 1}, "
                        "none converted to linear attention")
    return [(layer, head) for layer in layers for head in range(shape.n_heads)]


def search_identity(settings: SearchSettings, examples: list[Example], model_id: str) -> dict:
    """What a calibration search is, as its progress file records it (:class:`~headlab.core.journal.Journal`):
    the settings, the model and a digest of the examples."""
    text = json.dumps([[e.context(), list(e.choices), e.label] for e in examples], ensure_ascii=True)
    return {"settings": settings.to_dict(), "model": model_id,
            "examples": hashlib.sha256(text.encode()).hexdigest()}


def calibration_search(model, tokenizer, examples: list[Example], settings: SearchSettings,
                       progress_path: str | os.PathLike, batch_size: int = 16, progress: bool = True,
                       model_id: str | None = None) -> dict:
    """Measure accuracy with each candidate head calibrated alone; keep heads whose accuracy
    beats the unedited baseline by more than ``settings.margin``.

    Returns ``{"settings", "baseline", "heads": {"L,H": accuracy}, "kept": [[L, H], ...]}``. The
    baseline and each head's accuracy are kept as they finish in a journal at ``progress_path``
    (:func:`search_identity` of ``model_id``, default the model's ``name_or_path``), which the same
    search resumes; another search's file, or one changed by hand, is refused. ``progress``: a status
    line before the unedited pass and a bar over the heads, whose postfix names the layer's forward
    under way.
    """
    journal = Journal(Path(progress_path), search_identity(settings, examples, model_id or model.config.name_or_path),
                      "calibration")
    state = _resume(journal, settings)
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
        state["baseline"] = journal.put("baseline", accuracy(examples, unedited).accuracy)
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
            state["heads"][_key((layer, edit.heads[0]))] = journal.put(_key((layer, edit.heads[0])), result.accuracy)
            if not side_by_side:
                bar.update()
        if side_by_side:
            bar.update(len(edits))
    bar.close()
    state["kept"] = [list(c) for c in settings.candidates
                     if state["heads"][_key(c)] - state["baseline"] > settings.margin]
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


def _resume(journal: Journal, settings: SearchSettings) -> dict:
    """The search's state from its journal's finished pieces (a finite accuracy in [0, 1] each)."""
    pieces = {key: journal.get(key) for key in ("baseline", *map(_key, settings.candidates))}
    bad = [key for key, value in pieces.items() if value is not None and not (isinstance(value, (int, float))
                                                                               and 0 <= value <= 1)]
    if bad:
        raise InputFileError(f"{journal.path} holds an accuracy that is not a number in [0, 1] ({bad[0]}); move it "
                             "away to start afresh")
    heads = {key: value for key, value in pieces.items() if key != "baseline" and value is not None}
    return {"settings": settings.to_dict(), "baseline": pieces["baseline"], "heads": heads, "kept": []}
