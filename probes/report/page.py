"""The head-importance report's pages: report.html (an overview of every score and the heads' roles, then
each score's heatmap and top heads, the masking curves, compression evaluation and atlas found in the folder,
maps of the top heads) and views.html, written from the scores and one recorded window beside one shared
plotly.js; and one score's section as a notebook output (:func:`show_score`)."""

from __future__ import annotations

import json
from pathlib import Path

from ...core.errors import HeadlabError
from ...core.escaping import element_id, html_attribute, html_text
from ...core.files import GENERATOR_META, read_json_file, write_text
from ...core.head_scores import HeadScores, load_scores_file
from ..atlas.page import atlas_section
from ..compression.figure import compression_figure
from ..compression.file import compression_title, is_conversion
from ..figures import NotebookHTML, figure_div, notebook_html, output_id, plotly_script, score_heatmap
from ..scorers.record import AttentionRecord
from ..validation.figure import masking_figure, masking_subtitle
from ..views.data import ViewData, view_data_from_record
from ..views.figure import head_figure
from ..views.page import write_view
from .overview import overview_html, roles_html


def write_pages(out_dir: Path, provenance: dict, scores: dict[str, HeadScores], record: AttentionRecord,
                shown: tuple[int, int], pages: dict[str, str | None], curves: list[dict], compression: dict | None,
                atlas: dict | None, plotlyjs: str = "file") -> Path:
    """Write ``views.html`` (every head's map of ``record``, the report's first window; it opens on the top
    previous-token head) and ``report.html`` into ``out_dir``; ``shown`` is ``(n_views, top_k)``: the maps
    drawn on the page and the heads listed per score; ``pages`` each score's method page; ``plotlyjs`` as
    in :func:`~headlab.probes.figures.plotly_script`. Returns report.html's path."""
    n_views, top_k = shown
    data = view_data_from_record(record, provenance["n_kv_heads"], provenance["causal"])
    viewed = _view_heads(scores, n_views)
    write_view(data, out_dir / "views.html", scores, plotlyjs=plotlyjs)
    report = out_dir / "report.html"
    script = plotly_script(out_dir, plotlyjs)
    write_text(report, _report_html(provenance, scores, data, viewed, top_k, curves, pages, compression, atlas, script))
    return report


DOCS_ROOT = Path(__file__).resolve().parents[2]  # the source checkout: docs/ and the built site/


def method_link(page: str | None) -> str | None:
    """A ``file:`` link to a method page: the built documentation (``mkdocs build`` writes site/) or
    else its source; None when neither is on this machine (an installed wheel)."""
    if page is None:
        return None
    for path in (DOCS_ROOT / "site" / f"{page}.html", DOCS_ROOT / "docs" / f"{page}.md"):
        if path.is_file():
            return path.as_uri()
    return None


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
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; }
dl.provenance { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { font-weight: 600; }
dd { margin: 0; overflow-wrap: anywhere; }
section { border-top: 1px solid #ddd; margin-top: 1.5em; }
.note { color: #555; }
.figure, .table-box { max-width: 100%; overflow-x: auto; }
.overview { display: flex; flex-wrap: wrap; gap: 10px; }
.tile { display: flex; flex-direction: column; align-items: center; width: 128px; padding: 6px; gap: 3px;
        border: 1px solid #ddd; border-radius: 4px; text-decoration: none; color: inherit; font-size: 0.85em; }
.tile:hover { border-color: #1f77b4; }
.tile img { image-rendering: pixelated; border: 1px solid #eee; }
.tile-name { font-weight: 600; overflow-wrap: anywhere; text-align: center; }
.tile-top { color: #555; }
#roles td { text-align: left; }
"""


def _report_html(provenance: dict, scores: dict[str, HeadScores], data: ViewData, viewed: list[tuple[int, int, str]],
                 top_k: int, curves: list[dict], pages: dict[str, str | None], compression: dict | None,
                 atlas: dict | None, script: str) -> str:
    group = provenance["n_heads"] // provenance["n_kv_heads"]
    view_ids = {(l, h): element_id("view", f"L{l}", f"H{h}") for l, h, _ in viewed}
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR_META}",
        f"<title>headlab report: {html_text(provenance['model_id'])}</title>",
        f"<style>{STYLE}</style>{script}</head><body>",
        f"<h1>Head-importance report: {html_text(provenance['model_id'])}</h1>",
        _summary(provenance),
        "<details><summary>provenance</summary><dl class='provenance'>",
        *(f"<dt>{html_text(k)}</dt><dd>{html_text(v)}</dd>" for k, v in provenance.items()),
        "</dl></details><nav><b>Sections:</b> <a href='#overview'>overview</a> · <a href='#roles'>head roles</a> · ",
        " · ".join(f"<a href='#{element_id('score', n)}'>{html_text(n)}</a>" for n in scores),
        " · <a href='#masking'>masking validation</a> · <a href='#compression'>KV-cache compression</a>"
        " · <a href='#atlas'>head atlas</a> · <a href='#views'>attention views</a>"
        " · <a href='views.html'>interactive view of every head (views.html)</a></nav>",
        overview_html(scores),
        roles_html(scores, group),
        *(score_section(name, score, provenance["n_kv_heads"], top_k, pages.get(name), view_ids) for name, score in
          scores.items()),
        _masking_section(curves),
        _compression_section(compression),
        atlas_section(atlas),
        _views_section(provenance, data, viewed, view_ids),
        "</body></html>",
    ]
    return "\n".join(parts)


def _summary(provenance: dict) -> str:
    return (f"<p>{html_text(provenance['model_id'])}: {provenance['n_layers']} layers of {provenance['n_heads']} query "
            f"heads ({provenance['n_kv_heads']} KV heads), scored on {provenance['n_samples']} windows of "
            f"{provenance['n_tokens']} tokens of {html_text(provenance['text'])} (attention {html_text(provenance['method'])})."
            " <a href='views.html'>Every head's attention map: views.html</a></p>")


def score_section(name: str, score: HeadScores, n_kv_heads: int, top_k: int, page: str | None,
                  view_ids: dict | None = None, id_prefix: str = "") -> str:
    """One score's section: its description, method link and settings, its heatmap over every head (the
    colour bar says what the value is) and a table of its ``top_k`` heads; with ``view_ids`` (the maps
    drawn on the report) the table links each head's map and its place in views.html. ``id_prefix``
    keeps element ids apart where several outputs share one document (a notebook)."""
    group = score.values.shape[1] // n_kv_heads
    prefix = (id_prefix,) if id_prefix else ()
    return "".join([
        f"<section id='{element_id(*prefix, 'score', name)}'><h2>{html_text(name)}</h2>",
        f"<p>{html_text(score.description)}</p>",
        _method_paragraph(page),
        f"<details><summary>settings</summary><pre>{html_text(json.dumps(score.settings, indent=1))}</pre></details>",
        "<div class='figure'>", figure_div(score_heatmap(score, n_kv_heads), *prefix, "heatmap", name), "</div>",
        _top_table(score, group, top_k, view_ids), "</section>",
    ])


def _masking_section(curves: list[dict]) -> str:
    parts = ["<section id='masking'><h2>Masking validation</h2>"]
    if not curves:
        parts.append("<p>No masking curves in this folder yet: run <code>headlab validate MODEL --scores "
                     "scores.json --score retrieval --out .</code> here, then <code>headlab report MODEL --out . "
                     "--page-only</code> writes this page again (no scoring).</p>")
    for curve in curves:
        parts += [f"<h3>{html_text(curve['score'])}: {html_text(curve['metric'])}, {html_text(curve['mode'])} masking</h3>",
                  f"<p class='note'>{html_text(masking_subtitle(curve))}</p><div class='figure'>",
                  figure_div(masking_figure(curve), "masking", curve["score"]), "</div>",
                  "<div class='table-box'>", _masking_table(curve), "</div>"]
    parts.append("</section>")
    return "".join(parts)


def _views_section(provenance: dict, data: ViewData, viewed: list[tuple[int, int, str]], view_ids: dict) -> str:
    parts = [f"<section id='views'><h2>Attention views (sample 1 of {provenance['n_samples']}, "
             f"{len(data.tokens)} tokens)</h2><p class='note'>The maps of the top heads of each score in turn, as "
             "images (hover gives positions); <a href='views.html'>views.html</a> has every head with token "
             "labels, weights, the first token hidden or a log colour scale.</p>"]
    for layer, head, reason in viewed:
        parts += [f"<div id='{view_ids[(layer, head)]}'>",
                  f"<h3>{html_text(f'layer {layer}, head {head} (top by {reason})')}</h3>",
                  f"<p><a href='views.html#head={layer}.{head}'>open interactively</a></p>",
                  "<div class='figure'>", figure_div(head_figure(data, layer, head, image=True), "map", f"L{layer}",
                                                     f"H{head}"), "</div></div>"]
    parts.append("</section>")
    return "".join(parts)


def _compression_section(compression: dict | None) -> str:
    """The curves of ``compression.json`` when the folder has one, else how to make it."""
    if compression is None:
        return ("<section id='compression'><h2>KV-cache compression by streaming heads</h2><p>No compression "
                "evaluation in this folder yet: run <code>headlab stream-eval MODEL --scores scores.json --rules "
                "retrieval,random --out .</code> here (add <code>--scores razor</code> to the report for the razor "
                "rule), then <code>headlab report MODEL --out . --page-only</code> writes this page again (no "
                "scoring).</p></section>")
    if is_conversion(compression):
        heading = "KV-cache compression by conversion to linear attention"
        measured = (f"{html_text(compression_title(compression))}: the checkpoint's needle recall and perplexity "
                    "against its base model's, placed at the fraction of KV heads its softmax layers keep whole")
    else:
        heading = "KV-cache compression by streaming heads"
        measured = ("Needle recall and perplexity against the fraction of KV heads that keep the whole context, per "
                    "selection rule")
    return (f"<section id='compression'><h2>{heading}</h2><p>{measured}; the table and every prompt's response are "
            "in <a href='compression.html'>compression.html</a> and compression.json.</p><div class='figure'>"
            + figure_div(compression_figure(compression), "compression") + "</div></section>")


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


def _top_table(score: HeadScores, group: int, k: int, view_ids: dict | None) -> str:
    links = view_ids is not None
    rows = ["<div class='table-box'><table><tr><th>rank</th><th>layer</th><th>head</th><th>KV group</th><th>value</th>"
            + ("<th>view</th>" if links else "") + "</tr>"]
    for rank, (layer, head, value) in enumerate(score.top(k), start=1):
        link = ""
        if links:
            view = view_ids.get((layer, head))
            link = ("<td>" + (f"<a href='#{view}'>map</a> · " if view else "")
                    + f"<a href='views.html#head={layer}.{head}'>view</a></td>")
        rows.append(f"<tr><td>{rank}</td><td>{layer}</td><td>{head}</td><td>{head // group}</td>"
                    f"<td>{value:.4f}</td>{link}</tr>")
    rows.append("</table></div>")
    return "".join(rows)


def show_score(folder: str | Path, name: str, top_k: int = 10) -> NotebookHTML:
    """The section of the score ``name`` of the report in ``folder`` (its scores.json) as a notebook
    output: description, settings, heatmap and top ``top_k`` heads, self-contained (without the report's
    links to this machine's files and to views.html)."""
    path = Path(folder) / "scores.json"
    scores = load_scores_file(path)
    if name not in scores:
        raise HeadlabError(f"{path} has no score {name!r}; it has {', '.join(scores)}")
    n_kv_heads = read_json_file(path, "report scores")["n_kv_heads"]
    return notebook_html(score_section(name, scores[name], n_kv_heads, top_k, None, None, output_id("report")))


__all__ = ["method_link", "score_section", "show_score", "write_pages"]
