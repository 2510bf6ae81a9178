"""The head-importance report: scores every head on real text and writes report.html,
scores.json and scores.csv into one folder."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import importlib.metadata
import io
import json
import math
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...core.distributed import rank_and_world
from ...core.errors import HeadlabError, InputFileError
from ...core.files import claim_folder, read_json_file, write_json, write_text
from ...core.head_scores import HeadScores, load_scores_file
from ...core.kinds import index_spans
from ...core.shape import text_config
from ...core.text import load_text, token_windows
from ...surgeon import model_shape
from ...surgeon.conversion.converted import converted_layers
from ...surgeon.sites import has_causal_attention
from ...surgeon.taps import DEFAULT_MAP_BUDGET_BYTES
from ..atlas.page import load_atlas
from ..compression.file import load_compression
from ..figures import check_plotly_source
from ..scorers.families import FamilyInputs, requested_families
from ..scorers.patterns import (
    PATTERN_PAGES,
    PATTERN_SCORES,
    ScoreAccumulator,
    pattern_scores,
    pattern_scores_from_statistics,
)
from ..scorers.record import AttentionRecord, record_attention, record_statistics, scoring_method
from ..validation.file import load_curves
from .page import write_pages
from .settings import ReportSettings

REPORT_ENTRIES = ("report.html", "views.html", "scores.json", "scores.csv")
DEFAULT_TEXT = "Python standard-library docstrings"  # the provenance's name for the default text


def write_report(model, tokenizer, model_id: str, out_dir: str | Path, settings: ReportSettings | None = None,
                 progress: bool = True, overwrite: bool = False, plotlyjs: str = "file") -> Path | None:
    """Score every head of ``model`` and write the report folder; returns the path of report.html.
    Its pages get plotly.js as ``plotlyjs`` says (:func:`~headlab.probes.figures.plotly_script`): by
    default from one file beside them.

    The folder must be new, empty or hold only headlab's files (``overwrite``: anything; only the
    report's own files are replaced). Masking curves (``validation-*.json``), a compression
    evaluation (``compression.json``) and a head atlas (``atlas.json``) already in it are read, and
    checked, before any scoring. Score families that do not apply to the model (the
    decoder-only ones on an encoder) are listed in ``scores.json`` under ``"skipped"``.

    scores.json and scores.csv are rewritten after each sample, so a run that stops halfway keeps
    the scores computed so far (marked ``"complete": false``, with the families finished); the same
    report started again (same model and settings) takes the pattern scores and the families
    finished from there and scores only the rest.

    Under ``torch.distributed`` (e.g. ``torchrun --nproc_per_node 2 -m headlab report ...``) the
    windows of the pattern scores are sharded across ranks and their sums gathered on rank 0,
    which computes the other score families and writes the folder; other ranks return None.
    """
    settings = settings or ReportSettings()
    rank, world = rank_and_world()
    out_dir = Path(out_dir)
    curves = load_curves(out_dir)  # checked before anything is written
    compression = load_compression(out_dir)
    atlas = load_atlas(out_dir)
    converted = bool(converted_layers(model))
    if converted:
        check_converted_windows(model, settings.text.tokens)
    causal = has_causal_attention(model)
    text = load_text(settings.text.text_path)
    windows = token_windows(tokenizer, text, settings.text.windows, settings.text.tokens, settings.seed)
    provenance = _provenance(model, model_id, settings, causal)
    families, provenance["skipped"] = requested_families(settings, causal, converted)
    inputs = FamilyInputs(model, tokenizer, model_id, windows, settings, progress)
    for family in families:  # bad input fails here, before the folder is claimed or anything is scored
        if family.check is not None:
            family.check(inputs)
    if rank == 0:
        check_plotly_source(out_dir, plotlyjs)
        claim_folder(out_dir, REPORT_ENTRIES, overwrite, "report folder")
    partial = _partial_report(out_dir, model, provenance, settings) if world == 1 else None
    written = _PartialWriter(out_dir, model, provenance, settings)
    if partial is not None:  # the pattern scores were finished: only the first window's record is needed
        scores, pages, written.done = partial
        first = _first_record(model, tokenizer, windows[0], provenance["method"])
    else:
        first, scores = _pattern_pass(model, tokenizer, windows, provenance, causal, written, progress)
        if first is None:
            return None
        pages = dict(PATTERN_PAGES)
    for family in families:
        if family.name in written.done:
            continue
        if progress:
            tqdm.write(f"scoring {family.name}: {family.summary}", file=sys.stderr)
        for extra in family.run(inputs):
            scores[extra.name], pages[extra.name] = extra, family.page
            written.write(scores, pages)
        written.done.append(family.name)
        written.write(scores, pages)
    _write_scores(out_dir, model, provenance, scores, complete=True, pages=pages)
    if progress:
        tqdm.write("writing report.html and views.html", file=sys.stderr)
    return write_pages(out_dir, provenance, scores, first, (settings.n_views, settings.top_k), pages, curves,
                       compression, atlas, plotlyjs)


PATTERNS = "patterns"  # the pattern scores' entry among a partial report's finished families


class _PartialWriter:
    """Writes a report's scores.json as it goes (``"complete": false``), with the families finished
    (:data:`PATTERNS` first) and the settings, so that the same report started again resumes."""

    def __init__(self, out_dir: Path, model, provenance: dict, settings: ReportSettings):
        self.out_dir, self.model, self.provenance, self.settings = out_dir, model, provenance, settings
        self.done: list[str] = []

    def write(self, scores: dict[str, HeadScores], pages: dict[str, str | None] | None = None) -> None:
        _write_scores(self.out_dir, self.model, self.provenance, scores, complete=False, pages=pages,
                      partial={"families_done": self.done, "settings": _settings_record(self.settings)})


def _pattern_pass(model, tokenizer, windows, provenance: dict, causal: bool, written: _PartialWriter,
                  progress: bool) -> tuple[AttentionRecord | None, dict[str, HeadScores]]:
    """``(the first window's record, the pattern scores)`` over this rank's share of ``windows``
    (written after each window in one process; gathered on rank 0 under ``torch.distributed``);
    ``(None, {})`` on the ranks that only score."""
    rank, world = rank_and_world()
    accumulator = ScoreAccumulator()
    first: AttentionRecord | None = None
    model_id = provenance["model_id"]
    for ids in tqdm(windows[rank::world], desc="scoring heads", unit="sample", disable=not progress or rank > 0):
        if provenance["method"] == "statistics":
            accumulator.add(pattern_scores_from_statistics(record_statistics(model, ids), causal))
        else:
            record = record_attention(model, ids, tokenizer)
            accumulator.add(pattern_scores(record.maps, causal))
            first = first or record
        first = first or _first_record(model, tokenizer, ids, provenance["method"])
        if world == 1:
            written.write(_results(accumulator, model_id, provenance))
    if world > 1:
        accumulator.all_reduce()
        if rank > 0:
            return None, {}
        first = first or _first_record(model, tokenizer, windows[0], provenance["method"])
    scores = _results(accumulator, model_id, provenance)
    written.done.append(PATTERNS)
    written.write(scores, dict(PATTERN_PAGES))
    return first, scores


def _first_record(model, tokenizer, ids, method: str) -> AttentionRecord:
    """The record the attention views draw: the window's maps (its first :data:`VIEW_TOKENS` tokens
    where the report scores from statistics)."""
    return record_attention(model, ids if method == "maps" else ids[:, :VIEW_TOKENS], tokenizer)


def _settings_record(settings: ReportSettings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def _partial_report(out_dir: Path, model, provenance: dict, settings: ReportSettings):
    """``(scores, method pages, families finished)`` of a report of the same model and settings that
    stopped after its pattern scores, in ``out_dir``; None when there is none to resume."""
    path = out_dir / "scores.json"
    try:
        data = read_json_file(path, "report scores") if path.is_file() else None
    except InputFileError:  # a damaged file of headlab's (the folder is claimed): scored again
        return None
    partial = data.get("partial") if isinstance(data, dict) and not data.get("complete") else None
    if not isinstance(partial, dict) or PATTERNS not in partial.get("families_done", []):
        return None
    same = {key: value for key, value in data.get("provenance", {}).items() if key != "written"}
    if same != {key: value for key, value in provenance.items() if key != "written"} or \
            partial.get("settings") != _settings_record(settings):
        return None
    try:
        scores = load_scores_file(path, model_shape(model))
    except InputFileError:
        return None
    pages = {**PATTERN_PAGES, **data.get("method_pages", {})}
    return scores, pages, list(partial["families_done"])


def rewrite_report_pages(model, tokenizer, model_id: str, out_dir: str | Path, n_views: int = 6,
                         top_k: int = 10, plotlyjs: str = "file") -> Path:
    """Write report.html and views.html of a finished report folder again, without scoring: the
    scores from its ``scores.json``, with the masking curves, compression evaluation and atlas now
    in the folder; one forward of the report's first window draws the attention views (``plotlyjs``
    as for :func:`write_report`). Raises :class:`HeadlabError` when the folder holds no finished
    report of ``model_id`` or its text is gone."""
    out_dir = Path(out_dir)
    data, text_path = finished_report(out_dir, model_id)
    provenance = data["provenance"]
    scores = load_scores_file(out_dir / "scores.json", model_shape(model))
    curves, compression, atlas = load_curves(out_dir), load_compression(out_dir), load_atlas(out_dir)
    check_plotly_source(out_dir, plotlyjs)
    claim_folder(out_dir, REPORT_ENTRIES, False, "report folder")
    ids = token_windows(tokenizer, load_text(text_path), provenance["n_samples"], provenance["n_tokens"],
                        provenance["seed"])[0]
    record = _first_record(model, tokenizer, ids, provenance["method"])
    pages = {**PATTERN_PAGES, **data.get("method_pages", {})}
    return write_pages(out_dir, provenance, scores, record, (n_views, top_k), pages, curves, compression, atlas,
                       plotlyjs)


def _results(accumulator: ScoreAccumulator, model_id: str, provenance: dict) -> dict[str, HeadScores]:
    settings = {k: provenance[k] for k in ("n_samples", "n_tokens", "seed", "text", "causal")}
    return {name: accumulator.result(name, model_id, PATTERN_SCORES[name], settings) for name in PATTERN_SCORES}


VIEW_TOKENS = 512  # attention views of long inputs show this many leading tokens


def _converted_note(model) -> str:
    """What the provenance says of layers converted to linear attention (nothing when there are none)."""
    layers = converted_layers(model)
    if not layers:
        return ""
    named = index_spans(layers)
    return f"; layers {named} converted to linear attention: their maps are the converted form's weights"


def check_converted_windows(model_or_config, n_tokens: int) -> None:
    """For a model with layers converted to linear attention, which give their maps and not
    statistics: refuse windows whose maps exceed the budget (the report would score them from
    statistics) with a :class:`HeadlabError`."""
    if scoring_method(model_or_config, n_tokens) == "statistics":
        shape = model_shape(model_or_config)
        longest = math.isqrt(DEFAULT_MAP_BUDGET_BYTES // (4 * shape.n_layers * shape.n_heads))
        raise HeadlabError(f"this model has layers converted to linear attention, which the report scores from "
                         f"attention maps only; {n_tokens}-token windows' maps exceed the budget: use --tokens "
                         f"{longest} or fewer")


def _provenance(model, model_id: str, settings: ReportSettings, causal: bool) -> dict:
    shape = model_shape(model)
    method = scoring_method(model, settings.text.tokens)
    return {
        "model_id": model_id,
        "architecture": type(model).__name__,
        **shape.to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attention": f"headlab hook over the model's own {text_config(model.config)._attn_implementation} attention; "
                     + ("maps recomputed in fp32" if method == "maps" else "per-row statistics from the fused op (no maps)")
                     + _converted_note(model),
        "method": method,
        "causal": causal,
        "n_samples": settings.text.windows,
        "n_tokens": settings.text.tokens,
        "seed": settings.seed,
        "text": settings.text.text_path or DEFAULT_TEXT,
        "headlab": importlib.metadata.version("headlab"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def finished_report(out_dir: Path, model_id: str) -> tuple[dict, str | None]:
    """``(scores.json's contents, the text path its windows came from or None for the default text)``
    of a finished report of ``model_id`` in ``out_dir``, whose text is still there; else
    :class:`HeadlabError` saying what is missing."""
    path = Path(out_dir) / "scores.json"
    data = read_json_file(path, "report scores")
    if not isinstance(data, dict) or not isinstance(data.get("provenance"), dict) or not data.get("complete"):
        raise HeadlabError(f"{path} is not a finished headlab report's scores (write the report first)")
    provenance = data["provenance"]
    if provenance.get("model_id") != model_id:
        raise HeadlabError(f"{path} scores {provenance.get('model_id')!r}, not {model_id!r}")
    missing = [key for key in ("text", "n_samples", "n_tokens", "seed", "method", "n_heads", "n_kv_heads", "causal")
               if key not in provenance]
    if missing:
        raise HeadlabError(f"{path}'s provenance lacks {', '.join(missing)}")
    text_path = None if provenance["text"] == DEFAULT_TEXT else provenance["text"]
    if text_path is not None and not Path(text_path).is_file():
        raise HeadlabError(f"the report's text file {text_path} is no longer there; its first window draws the views")
    return data, text_path


def _write_scores(out_dir: Path, model, provenance: dict, scores: dict[str, HeadScores], complete: bool,
                  pages: dict[str, str | None] | None = None, partial: dict | None = None) -> None:
    shape = model_shape(model)
    write_json(
        out_dir / "scores.json",
        {
            "model_id": provenance["model_id"],
            "n_layers": shape.n_layers,
            "n_heads": shape.n_heads,
            "n_kv_heads": shape.n_kv_heads,
            "complete": complete,
            "provenance": provenance,
            "scores": {name: s.to_dict() for name, s in scores.items()},
            "method_pages": {name: page for name, page in (pages or {}).items() if name in scores},
            **({"partial": partial} if partial is not None and not complete else {}),
        },
    )
    write_text(out_dir / "scores.csv", _scores_csv(shape.group_size, scores))


def _scores_csv(group_size: int, scores: dict[str, HeadScores]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(scores)
    writer.writerow(["layer", "head", "kv_group", *names])
    n_layers, n_heads = next(iter(scores.values())).values.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            values = [scores[n].values[layer, head].item() for n in names]
            writer.writerow([layer, head, head // group_size, *("" if math.isnan(v) else f"{v:.6g}" for v in values)])
    return buffer.getvalue()


__all__ = ["ReportSettings", "finished_report", "rewrite_report_pages", "write_report"]
