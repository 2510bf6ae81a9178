"""Every page kind headlab writes, read as a researcher reads it, in headless Chromium at 1,400 px: no
console error, no horizontal overflow, plotly.js shared from one file beside the pages, every figure
under its own heading with titled colour bars, the report's overview and head roles, the atlas's
cluster legend and labelled axes.
"""

import json

import pytest
from conftest import CharTokenizer, tiny_llama
from test_atlas import planted
from test_hostile_pages import hostile_compression, hostile_curve
from test_view_browser import CHROMIUM, SCREENSHOTS, browser  # noqa: F401 (browser is a fixture)
from test_views import hostile_ids

from headlab.core.head_scores import load_scores_file
from headlab.core.text import TextWindows
from headlab.probes import ReportSettings, write_report
from headlab.probes.atlas.build import atlas_document, build_atlas
from headlab.probes.atlas.page import write_atlas
from headlab.probes.compression.page import write_compression_page
from headlab.probes.figures import plotly_file_name
from headlab.probes.validation.page import write_curve_page
from headlab.sae import SparseAutoencoder, collect_examples, write_dashboard

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (CI installs it)"), pytest.mark.slow]

WIDTH = 1400


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A report folder with a masking curve, a compression evaluation and an atlas written beside it,
    then the report (which shows them all), and an SAE dashboard."""
    out = tmp_path_factory.mktemp("pages") / "report"
    out.mkdir()
    write_curve_page(hostile_curve("retrieval"), out / "validation-retrieval.html")
    (out / "validation-retrieval.json").write_text(json.dumps(hostile_curve("retrieval")))
    write_compression_page(hostile_compression("retrieval", "tiny"), out / "compression.html")
    (out / "compression.json").write_text(json.dumps(hostile_compression("retrieval", "tiny")))
    descriptors, _ = planted(per_type=4)
    write_atlas(out, atlas_document(build_atlas([descriptors], k=3), ["tiny"]), overwrite=True)
    (out / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1", "entries": [
        "validation-retrieval.json", "validation-retrieval.html", "compression.json", "compression.html", "atlas.json",
        "atlas.html", plotly_file_name()]}))
    text = out.parent / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 20)
    settings = ReportSettings(text=TextWindows(windows=2, tokens=40, text_path=str(text)), seed=1, n_views=2,
                              families=("induction",))
    write_report(tiny_llama("gqa"), CharTokenizer(), "tiny-gqa", out, settings, progress=False)
    model = tiny_llama("gqa", layers=2)
    windows = [hostile_ids(12, seed=s) for s in range(2)]
    sae = SparseAutoencoder(54, 32, "topk", 4, 9, 6)
    examples = collect_examples(model, sae, windows, 1, [0, 1], progress=False)
    write_dashboard(out / "features.html", sae, examples, [[str(i) for i in w[0].tolist()] for w in windows], "tiny")
    return out


def open_at_width(browser, path):
    """``path`` at 1,400 px wide, loaded and settled; the page and its console errors."""
    page = browser.new_page(viewport={"width": WIDTH, "height": 1200})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_timeout(500)
    return page, errors


@pytest.mark.parametrize("name", ["report.html", "views.html", "atlas.html", "compression.html",
                                  "validation-retrieval.html", "features.html"])
def test_every_page_loads_without_errors_or_horizontal_overflow(browser, folder, name):
    page, errors = open_at_width(browser, folder / name)
    if name == "views.html":
        page.wait_for_selector(".headlab-view[data-ready='1']", timeout=60_000)
    assert errors == []
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH
    graphs = page.locator(".plotly-graph-div, .js-plotly-plot").count()
    if name != "features.html":
        assert graphs >= 1
        assert page.evaluate("typeof Plotly") == "object"
        assert page.locator(f"script[src='{plotly_file_name()}']").count() == 1  # shared, not inlined
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"page-{name}.png"), full_page=True)


def test_report_opens_with_an_overview_of_every_score_and_the_heads_roles(browser, folder):
    page, errors = open_at_width(browser, folder / "report.html")
    scores = load_scores_file(folder / "scores.json")
    tiles = page.locator("#overview a.tile")
    assert tiles.count() == len(scores)
    hrefs = tiles.evaluate_all("ts => ts.map(t => t.getAttribute('href'))")
    for href in hrefs:  # one click from each tile to its score's section
        assert page.locator(href).count() == 1 and page.locator(f"{href} h2").count() == 1
    assert page.locator("#overview").evaluate("e => e.getBoundingClientRect().top") < 1200  # above the fold
    assert page.locator("#roles table").count() >= 1
    best = scores["previous_token"].top(1)[0]
    assert f"L{best[0]}.H{best[1]}" in page.inner_text("#roles")
    assert errors == []


def test_every_report_figure_sits_under_its_heading_with_titled_colour_bars(browser, folder):
    page, _ = open_at_width(browser, folder / "report.html")
    # for each figure: the nearest heading before it in document order, inside the same section
    orphans = page.evaluate("""() => [...document.querySelectorAll('.plotly-graph-div')].filter(gd => {
        const section = gd.closest('section');
        const headings = section ? [...section.querySelectorAll('h2, h3')] : [];
        return !headings.some(h => h.compareDocumentPosition(gd) & Node.DOCUMENT_POSITION_FOLLOWING);
    }).map(gd => gd.id)""")
    assert orphans == []
    untitled = page.evaluate("""() => [...document.querySelectorAll('.plotly-graph-div')].flatMap(gd =>
        (gd.data || []).filter(t => (t.type === 'heatmap' && t.showscale !== false) || (t.marker && t.marker.showscale))
          .filter(t => !((t.colorbar || t.marker.colorbar || {}).title || {}).text).map(() => gd.id))""")
    assert untitled == []
    titles = page.evaluate("""() => [...document.querySelectorAll('.plotly-graph-div')].map(gd => {
        const t = gd.querySelector('.gtitle'); if (!t) return true;
        const box = t.getBoundingClientRect(), own = gd.getBoundingClientRect();
        return box.left >= own.left - 1 && box.right <= own.right + 1; })""")
    assert all(titles)  # no figure title runs past its figure


def test_atlas_has_a_cluster_legend_and_labelled_axes(browser, folder):
    page, errors = open_at_width(browser, folder / "atlas.html")
    figure = page.locator(".plotly-graph-div").first
    legend = figure.locator(".legend .traces")
    doc = json.loads((folder / "atlas.json").read_text())
    assert legend.count() == len(doc["names"])
    assert set(legend.evaluate_all("ts => ts.map(t => t.textContent)")) == set(doc["names"])
    axes = figure.evaluate("gd => [gd._fullLayout.xaxis.title.text, gd._fullLayout.yaxis.title.text]")
    assert all(axes) and axes[0] != axes[1]
    assert errors == []


def test_notebook_outputs_render_together_in_one_document(browser, folder, tmp_path):
    """What Jupyter does with three cells' outputs: their HTML in one document, each with its own plotly.js
    guard; every output renders, with no error and no id shared between them."""
    from headlab.probes import gather_view, load_atlas, show_atlas, show_score, show_view

    data = gather_view(tiny_llama("gqa", layers=3), CharTokenizer(), hostile_ids(20), "tiny", progress=False)
    outputs = [show_view(data), show_view(data), show_atlas(load_atlas(folder)), show_score(folder, "induction")]
    document = tmp_path / "notebook.html"
    document.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>"
                        + "".join(f"<div class='cell'>{o._repr_html_()}</div>" for o in outputs) + "</body></html>")
    page, errors = open_at_width(browser, document)
    page.wait_for_function("document.querySelectorAll('.headlab-view[data-ready=\"1\"]').length === 2")
    ids = page.evaluate("[...document.querySelectorAll('[id]')].filter(e => !e.closest('svg')).map(e => e.id)")
    assert len(ids) == len(set(ids))
    rendered = page.evaluate("[...document.querySelectorAll('.cell')].map(c => c.querySelectorAll('.main-svg').length)")
    assert all(count > 0 for count in rendered)
    assert errors == []
