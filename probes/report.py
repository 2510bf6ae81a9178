"""The head-importance report: scores every head on real text and writes report.html,
scores.json and scores.csv into one folder."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import math
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..surgeon import model_shape
from ..surgeon.conversion.converted import converted_layers
from ..surgeon.distributed import rank_and_world
from ..surgeon.errors import HeadlabError
from ..surgeon.files import claim_folder, read_json_file, write_json, write_text
from ..surgeon.settings import index_spans
from ..surgeon.shape import text_config
from ..surgeon.sites import has_causal_attention
from ..surgeon.taps import DEFAULT_MAP_BUDGET_BYTES
from .corpus import load_text, token_windows
from .score_families import FamilyInputs, requested_families
from .report_settings import ReportSettings
from .atlas_page import load_atlas
from .compression_file import load_compression
from .validation_file import load_curves
from .record import AttentionRecord, record_attention, record_statistics, scoring_method
from .report_page import write_pages
from .scores import (PATTERN_PAGES, PATTERN_SCORES, HeadScores, ScoreAccumulator, load_scores_file, pattern_scores,
                     pattern_scores_from_statistics)


REPORT_ENTRIES = ("report.html", "views.html", "scores.json", "scores.csv")
DEFAULT_TEXT = "Python standard-library docstrings"  # the provenance's name for the default text


def write_report(model, tokenizer, model_id: str, out_dir: str | Path, settings: ReportSettings | None = None,
                 progress: bool = True, overwrite: bool = False) -> Path | None:
    """Score every head of ``model`` and write the report folder; returns the path of report.html.

    The folder must be new, empty or hold only headlab's files (``overwrite``: anything; only the
    report's own files are replaced). Masking curves (``validation-*.json``), a compression
    evaluation (``compression.json``) and a head atlas (``atlas.json``) already in it are read, and
    checked, before any scoring. Score families that do not apply to the model (the
    decoder-only ones on an encoder) are listed in ``scores.json`` under ``"skipped"``.

    scores.json and scores.csv are rewritten after each sample, so a run that stops halfway keeps
    the scores computed so far (marked ``"complete": false``).

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
        check_converted_windows(model, settings.n_tokens)
    causal = has_causal_attention(model)
    text = load_text(settings.text_path)
    windows = token_windows(tokenizer, text, settings.n_samples, settings.n_tokens, settings.seed)
    provenance = _provenance(model, model_id, settings, causal)
    families, provenance["skipped"] = requested_families(settings, causal, converted)
    inputs = FamilyInputs(model, tokenizer, model_id, windows, settings, progress)
    for family in families:  # bad input fails here, before the folder is claimed or anything is scored
        if family.check is not None:
            family.check(inputs)
    if rank == 0:
        claim_folder(out_dir, REPORT_ENTRIES, overwrite, "report folder")
    accumulator = ScoreAccumulator()
    first: AttentionRecord | None = None
    shard = windows[rank::world]
    for index, ids in enumerate(tqdm(shard, desc="scoring heads", unit="sample", disable=not progress or rank > 0)):
        if provenance["method"] == "statistics":
            accumulator.add(pattern_scores_from_statistics(record_statistics(model, ids), causal))
            first = first or record_attention(model, ids[:, :VIEW_TOKENS], tokenizer)
        else:
            record = record_attention(model, ids, tokenizer)
            accumulator.add(pattern_scores(record.maps, causal))
            first = first or record
        if world == 1:
            _write_scores(out_dir, model, provenance, _results(accumulator, model_id, provenance), complete=False)
    if world > 1:
        accumulator.all_reduce()
        if rank > 0:
            return None
        first = record_attention(model, windows[0], tokenizer) if first is None else first
    scores = _results(accumulator, model_id, provenance)
    pages = dict(PATTERN_PAGES)
    for extra, page in _extra_scores(families, inputs):
        scores[extra.name], pages[extra.name] = extra, page
        _write_scores(out_dir, model, provenance, scores, complete=False, pages=pages)
    _write_scores(out_dir, model, provenance, scores, complete=True, pages=pages)
    return write_pages(out_dir, provenance, scores, first, (settings.n_views, settings.top_k), pages, curves,
                       compression, atlas)


def rewrite_report_pages(model, tokenizer, model_id: str, out_dir: str | Path, n_views: int = 6,
                         top_k: int = 10) -> Path:
    """Write report.html and views.html of a finished report folder again, without scoring: the
    scores from its ``scores.json``, with the masking curves, compression evaluation and atlas now
    in the folder; one forward of the report's first window draws the attention views. Raises
    :class:`HeadlabError` when the folder holds no finished report of ``model_id`` or its text is gone."""
    out_dir = Path(out_dir)
    data, text_path = finished_report(out_dir, model_id)
    provenance = data["provenance"]
    scores = load_scores_file(out_dir / "scores.json", model_shape(model))
    curves, compression, atlas = load_curves(out_dir), load_compression(out_dir), load_atlas(out_dir)
    claim_folder(out_dir, REPORT_ENTRIES, False, "report folder")
    ids = token_windows(tokenizer, load_text(text_path), provenance["n_samples"], provenance["n_tokens"],
                        provenance["seed"])[0]
    record = record_attention(model, ids if provenance["method"] == "maps" else ids[:, :VIEW_TOKENS], tokenizer)
    pages = {**PATTERN_PAGES, **data.get("method_pages", {})}
    return write_pages(out_dir, provenance, scores, record, (n_views, top_k), pages, curves, compression, atlas)


def _extra_scores(families, inputs: FamilyInputs):
    """Yield ``(HeadScores, documentation page)`` of each of ``families`` (:mod:`.score_families`), one by one."""
    for family in families:
        for scores in family.run(inputs):
            yield scores, family.page


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
    method = scoring_method(model, settings.n_tokens)
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
        "n_samples": settings.n_samples,
        "n_tokens": settings.n_tokens,
        "seed": settings.seed,
        "text": settings.text_path or DEFAULT_TEXT,
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
                  pages: dict[str, str | None] | None = None) -> None:
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
