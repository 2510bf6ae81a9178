"""The attention page in a real browser: Debian's Chromium, headless, driven by Playwright.

CI (.ci/run) installs Chromium and sets HEADLAB_REQUIRE_BROWSER=1, so a missing browser fails
there; elsewhere these tests are skipped with the reason when no Chromium is found.
"""

import math
import os
import shutil
from pathlib import Path

import pytest

from conftest import tiny_llama
from headlab.probes.figures import export_figure
from headlab.probes.views.figure import view
from headlab.probes.views.data import gather_view
from headlab.probes.views.page import write_view
from headlab.surgeon import Calibrate, Plan
from test_views import HOSTILE, HostileTokenizer, hostile_ids

CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)
SCREENSHOTS = Path(os.environ.get("HEADLAB_SCREENSHOTS", "/tmp/headlab-screenshots"))

if CHROMIUM is None and os.environ.get("HEADLAB_REQUIRE_BROWSER"):
    raise RuntimeError("HEADLAB_REQUIRE_BROWSER is set but no Chromium was found (apt-get install chromium)")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (CI installs it)"), pytest.mark.slow]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


def open_page(browser, path: Path):
    """Load ``path``; return the page and the list that collects console errors/page errors."""
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector(".headlab-view[data-ready='1']", timeout=60_000)
    return page, errors


def plot_area(page, selector: str):
    return page.locator(f"{selector} .nsewdrag").first.bounding_box()


@pytest.fixture(scope="module")
def short_page(tmp_path_factory):
    model = tiny_llama("gqa", layers=3)
    plan = Plan([Calibrate(layer=2, heads=(0, 1), relative_c=2.0, drop_first="none")])
    data = gather_view(model, HostileTokenizer(), hostile_ids(40), "tiny", plan=plan, progress=False)
    return write_view(data, tmp_path_factory.mktemp("view") / "short.html", head=(2, 0))


def test_page_loads_clicks_and_hovers_without_errors(browser, short_page):
    page, errors = open_page(browser, short_page)
    assert page.locator(".hl-overview .main-svg").count() > 0
    assert page.locator(".hl-detail .heatmaplayer").count() > 0
    assert page.inner_text(".hl-detail-title").startswith("layer 2, head 0")

    area = plot_area(page, ".hl-detail")  # first panel: before surgery, 40 token rows
    x, y = area["x"] + area["width"] * 0.25, area["y"] + area["height"] * (30.5 / 40)
    page.mouse.move(x, y)
    page.wait_for_function("document.querySelector('.hl-hover').textContent.length > 0")
    assert page.inner_text(".hl-hover").startswith("query 30 ")
    page.mouse.click(x, y)
    page.wait_for_function("document.querySelector('.hl-tokens-title').textContent.startsWith('attention of query 30')")
    coloured = page.eval_on_selector_all(".hl-tokens span", "s => s.filter(e => e.style.backgroundColor).length")
    assert coloured == 40
    assert page.locator(".hl-tokens span.query").count() == 1

    grid = plot_area(page, ".hl-overview")  # 3 layers (bottom to top) x 9 heads: click layer 0, head 8
    page.mouse.click(grid["x"] + grid["width"] * (8.5 / 9), grid["y"] + grid["height"] * (2.5 / 3))
    page.wait_for_function("document.querySelector('.hl-detail-title').textContent.startsWith('layer 0, head 8')")

    page.select_option(".hl-score", "sink_first_token")
    page.wait_for_function("document.querySelector('.hl-overview .gtitle').textContent.startsWith('sink_first_token')")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "browser-short.png"), full_page=True)
    assert errors == []


def test_hostile_tokens_render_as_text_and_run_nothing(browser, short_page):
    page, errors = open_page(browser, short_page)
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".hl-tokens img").count() == 0 and page.locator(".hl-tokens script").count() == 0
    text = page.inner_text(".hl-tokens")
    assert HOSTILE[0] in text and HOSTILE[1] in text
    ticks = page.eval_on_selector_all(".hl-detail .ytick text", "t => t.map(e => e.textContent)")
    assert f"3: {HOSTILE[0][:23]}\u2026" in ticks  # the markup as characters (labels cut at 24)
    assert page.evaluate("window.__pwned") is None and errors == []


def test_long_input_renders_pooled_image_with_block_hover(browser, tmp_path):
    model = tiny_llama("mqa", layers=2)
    data = gather_view(model, HostileTokenizer(), hostile_ids(1100, seed=4), "tiny", progress=False)
    path = write_view(data, tmp_path / "long.html", head=(1, 2))
    page, errors = open_page(browser, path)
    assert "2-token blocks" in page.inner_text(".hl-summary")
    assert page.locator(".hl-detail .imagelayer image").count() == 1
    area = plot_area(page, ".hl-detail")
    x, y = area["x"] + area["width"] * 0.2, area["y"] + area["height"] * 0.7
    page.mouse.move(x, y)
    page.wait_for_function("document.querySelector('.hl-hover').textContent.startsWith('queries ')")
    page.mouse.click(x, y)
    page.wait_for_function("document.querySelector('.hl-tokens-title').textContent.includes('per key block')")
    page.screenshot(path=str(tmp_path / "long.png"))
    assert errors == []


def test_static_export_writes_png_and_svg(tmp_path):
    model = tiny_llama("gqa", layers=2)
    data = gather_view(model, HostileTokenizer(), hostile_ids(12), "tiny", progress=False)
    png = export_figure(view(data), tmp_path / "grid.png", width=500, height=300)
    svg = export_figure(view(data, 1, 3), tmp_path / "head.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = svg.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<svg") and "3: &#60;script&#62;window.__pwned=1" in text
    assert "<script" not in text and "<img" not in text
    with pytest.raises(ValueError, match="png, .svg or .pdf"):
        export_figure(view(data), tmp_path / "grid.jpg")


def test_link_with_head_hash_opens_that_head(browser, short_page):
    page = browser.new_page()
    page.goto(short_page.as_uri() + "#head=1.4")
    page.wait_for_selector(".headlab-view[data-ready='1']", timeout=60_000)
    assert page.inner_text(".hl-detail-title").startswith("layer 1, head 4")


def test_view_opens_on_the_grids_top_head_and_hides_the_first_token_or_uses_a_log_scale(browser, tmp_path):
    model = tiny_llama("gqa", layers=3)
    data = gather_view(model, HostileTokenizer(), hostile_ids(30), "tiny", progress=False)
    path = write_view(data, tmp_path / "view.html")  # no head named: the grid's top head opens
    page, errors = open_page(browser, path)
    scores = data.scores["previous_token"]
    layer, head = divmod(int(scores.flatten().argmax()), scores.shape[1])
    assert page.inner_text(".hl-detail-title").startswith(f"layer {layer}, head {head}")
    weights = page.evaluate("document.querySelector('.hl-detail').data[0].customdata")
    assert any(row[0] > 0 for row in weights[1:])
    page.check(".hl-hide-first")
    page.wait_for_function("document.querySelector('.hl-detail').data[0].customdata.every(row => row[0] === 0)")
    hidden = page.evaluate("document.querySelector('.hl-detail').data[0].customdata")
    for q in range(1, len(weights)):  # renormalised: each row keeps its total, the first column's weight spread
        if sum(weights[q][1:]) > 0:
            assert sum(hidden[q]) == pytest.approx(sum(weights[q]), rel=1e-4)
    assert "first token hidden" in page.evaluate("document.querySelector('.hl-detail').data[0].colorbar.title.text")
    page.uncheck(".hl-hide-first")
    page.check(".hl-log")
    page.wait_for_function(
        "document.querySelector('.hl-detail').data[0].colorbar.title.text.includes('log scale')")
    z = page.evaluate("document.querySelector('.hl-detail').data[0].z")
    positive = [(q, k) for q, row in enumerate(weights) for k, w in enumerate(row) if w > 0]
    q, k = positive[len(positive) // 2]
    assert z[q][k] == pytest.approx(math.log10(weights[q][k]), abs=1e-4)  # colours from log10 of the weight
    assert errors == []
