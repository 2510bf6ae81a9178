"""The head-importance report: scores every head on real text and writes report.html,
scores.json and scores.csv into one folder."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import json
import math
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..surgeon import model_shape
from ..surgeon.conversion.converted import converted_layers
from ..surgeon.distributed import rank_and_world
from ..surgeon.errors import HeadlabError
from ..surgeon.escaping import element_id, html_attribute, html_text
from ..surgeon.files import GENERATOR_META, claim_folder, write_json, write_text
from ..surgeon.shape import text_config
from ..surgeon.sites import has_causal_attention
from ..surgeon.taps import DEFAULT_MAP_BUDGET_BYTES
from . import views
from .corpus import load_text, token_windows
from .score_families import FamilyInputs, requested_families
from .report_settings import ReportSettings
from .atlas_page import atlas_section, load_atlas
from .compression import load_compression
from .validation_file import load_curves
from .record import AttentionRecord, record_attention, record_statistics, scoring_method
from .view_data import ViewData, view_data_from_record
from .view_page import write_view
from .scores import (PATTERN_PAGES, PATTERN_SCORES, HeadScores, ScoreAccumulator, pattern_scores,
                     pattern_scores_from_statistics)




REPORT_ENTRIES = ("report.html", "views.html", "scores.json", "scores.csv")


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
        _write_scores(out_dir, model, provenance, scores, complete=False)
    _write_scores(out_dir, model, provenance, scores, complete=True)
    shape = model_shape(model)
    data = view_data_from_record(first, shape.n_kv_heads, causal)
    viewed = _view_heads(scores, settings.n_views)
    write_view(data, out_dir / "views.html", scores, head=viewed[0][:2] if viewed else None)
    report = out_dir / "report.html"
    write_text(report, _report_html(model, provenance, scores, data, viewed, settings, curves, pages, compression,
                                    atlas))
    return report


def _extra_scores(families, inputs: FamilyInputs):
    """Yield ``(HeadScores, documentation page)`` of each of ``families`` (:mod:`.score_families`), one by one."""
    for family in families:
        for scores in family.run(inputs):
            yield scores, family.page


DOCS_ROOT = Path(__file__).resolve().parents[1]  # the source checkout: docs/ and the built site/


def method_link(page: str | None) -> str | None:
    """A ``file:`` link to a method page: the built documentation (``mkdocs build`` writes site/) or
    else its source; None when neither is on this machine (an installed wheel)."""
    if page is None:
        return None
    for path in (DOCS_ROOT / "site" / f"{page}.html", DOCS_ROOT / "docs" / f"{page}.md"):
        if path.is_file():
            return path.as_uri()
    return None


def _results(accumulator: ScoreAccumulator, model_id: str, provenance: dict) -> dict[str, HeadScores]:
    settings = {k: provenance[k] for k in ("n_samples", "n_tokens", "seed", "text", "causal")}
    return {name: accumulator.result(name, model_id, PATTERN_SCORES[name], settings) for name in PATTERN_SCORES}


VIEW_TOKENS = 512  # attention views of long inputs show this many leading tokens


def _converted_note(model) -> str:
    """What the provenance says of layers converted to linear attention (nothing when there are none)."""
    layers = sorted(converted_layers(model))
    if not layers:
        return ""
    runs: list[list[int]] = []
    for layer in layers:  # consecutive layers as one range: "0-29", "0, 2"
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    named = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
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
        "text": settings.text_path or "Python standard-library docstrings",
        "headlab": importlib.metadata.version("headlab"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_scores(out_dir: Path, model, provenance: dict, scores: dict[str, HeadScores], complete: bool) -> None:
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


def _view_heads(scores: dict[str, HeadScores], n_views: int) -> list[tuple[int, int, str]]:
    """Heads worth looking at: the top heads of each score in turn, without repeats."""
    chosen: list[tuple[int, int, str]] = []
    ranked = {name: s.top(n_views) for name, s in scores.items() if name != "entropy"}
    for rank in range(n_views):
        for name, top in ranked.items():
            if rank < len(top) and len(chosen) < n_views:
                layer, head, _ = top[rank]
                if all((layer, head) != (l, h) for l, h, _ in chosen):
                    chosen.append((layer, head, name))
    return chosen


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
dl.provenance { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { font-weight: 600; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
"""


def _report_html(model, provenance: dict, scores: dict[str, HeadScores], data: ViewData,
                 viewed: list[tuple[int, int, str]], settings: ReportSettings, curves: list[dict],
                 pages: dict[str, str | None], compression: dict | None = None, atlas: dict | None = None) -> str:
    group = model_shape(model).group_size
    view_ids = {(l, h): element_id("view", f"L{l}", f"H{h}") for l, h, _ in viewed}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR_META}",
        f"<title>headlab report: {html_text(provenance['model_id'])}</title>",
        f"<style>{STYLE}</style><script>{views.plotly_js()}</script></head><body>",
        f"<h1>Head-importance report: {html_text(provenance['model_id'])}</h1>",
        "<dl class='provenance'>",
        *(f"<dt>{html_text(k)}</dt><dd>{html_text(v)}</dd>" for k, v in provenance.items()),
        "</dl><nav><b>Scores:</b> ",
        " · ".join(f"<a href='#{element_id('score', n)}'>{html_text(n)}</a>" for n in scores),
        " · <a href='#masking'>masking validation</a> · <a href='#compression'>KV-cache compression</a>"
        " · <a href='#atlas'>head atlas</a>"
        " · <a href='#views'>attention views</a>",
        " · <a href='views.html'>interactive view of every head (views.html)</a></nav>",
    ]
    for name, score in scores.items():
        parts += [
            f"<section id='{element_id('score', name)}'><h2>{html_text(name)}</h2>",
            f"<p>{html_text(score.description)}</p>",
            _method_paragraph(pages.get(name)),
            f"<details><summary>settings</summary><pre>{html_text(json.dumps(score.settings, indent=1))}</pre>"
            "</details>",
            views.figure_div(views.score_heatmap(score, provenance["n_kv_heads"]), "heatmap", name),
            _top_table(score, group, settings.top_k, view_ids),
            "</section>",
        ]
    parts.append("<section id='masking'><h2>Masking validation</h2>")
    if not curves:
        parts.append("<p>No masking curves in this folder yet: run <code>headlab validate MODEL --scores "
                     "scores.json --score retrieval --out .</code> here, then write the report again.</p>")
    for curve in curves:
        parts.append(views.figure_div(views.masking_figure(curve), "masking", curve["score"]))
        parts.append(_masking_table(curve))
    parts.append("</section>")
    parts.append(_compression_section(compression))
    parts.append(atlas_section(atlas))
    parts.append(f"<section id='views'><h2>Attention views (sample 1 of {provenance['n_samples']}, "
                 f"{len(data.tokens)} tokens)</h2>")
    for layer, head, reason in viewed:
        title = f"layer {layer}, head {head} (top by {reason})"
        parts += [
            f"<div id='{view_ids[(layer, head)]}'><h3>{html_text(title)}</h3>",
            f"<p><a href='views.html#head={layer}.{head}'>open interactively</a></p>",
            views.figure_div(views.head_figure(data, layer, head), "map", f"L{layer}", f"H{head}"),
            "</div>",
        ]
    parts.append("</section></body></html>")
    return "\n".join(parts)


def _compression_section(compression: dict | None) -> str:
    """The curves of ``compression.json`` when the folder has one, else how to make it."""
    head = "<section id='compression'><h2>KV-cache compression by streaming heads</h2>"
    if compression is None:
        return (head + "<p>No compression evaluation in this folder yet: run <code>headlab stream-eval MODEL "
                "--scores scores.json --rules retrieval,random --out .</code> here (add <code>--scores razor</code> "
                "to the report for the razor rule), then write the report again.</p></section>")
    return (head + "<p>Needle recall and perplexity against the fraction of KV heads that keep the whole context, "
            "per selection rule; the table and every prompt's response are in <a href='compression.html'>"
            "compression.html</a> and compression.json.</p>"
            + views.figure_div(views.compression_figure(compression), "compression") + "</section>")


def _method_paragraph(page: str | None) -> str:
    link = method_link(page)
    if link is None:
        return ""
    return f"<p class='method'><a href='{html_attribute(link)}'>how this score is computed ({html_text(page)})</a></p>"


def _masking_table(curve: dict) -> str:
    """Per measure and K: the top-K and random-K means with their 95% intervals and both p-values."""
    def interval(mean, ci):
        return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    rows = []
    for name, summary in curve["summary"].items():
        for k, r in summary["by_k"].items():
            rows.append(f"<tr><td>{html_text(name)}</td><td>{html_text(k)}</td>"
                        f"<td>{interval(r['top_mean'], r['top_ci'])}</td>"
                        f"<td>{interval(r['random_mean'], r['random_ci'])}</td>"
                        f"<td>{r['rank_p']:.3g}</td><td>{r['paired_p']:.3g}</td></tr>")
    if not rows:
        return "<p>The unmasked model answered none of the prompts: nothing to compare.</p>"
    return ("<table><tr><th>measure</th><th>K</th><th>top-K mean [95% CI]</th><th>random-K mean [95% CI]</th>"
            "<th>rank p (vs the random sets)</th><th>paired p (per item)</th></tr>" + "".join(rows) + "</table>")


def _top_table(score: HeadScores, group: int, k: int, view_ids: dict) -> str:
    rows = ["<table><tr><th>rank</th><th>layer</th><th>head</th><th>KV group</th><th>value</th><th>view</th></tr>"]
    for rank, (layer, head, value) in enumerate(score.top(k), start=1):
        view = view_ids.get((layer, head))
        link = (f"<a href='#{view}'>map</a> · " if view else "") + f"<a href='views.html#head={layer}.{head}'>view</a>"
        rows.append(f"<tr><td>{rank}</td><td>{layer}</td><td>{head}</td><td>{head // group}</td>"
                    f"<td>{value:.4f}</td><td>{link}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


__all__ = ["ReportSettings", "write_report"]
