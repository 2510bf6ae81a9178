"""Every page headlab writes, with hostile strings in every field that reaches it (tokens, model
ids, score names and descriptions, settings values, file names, plan names, generated responses),
opened in headless Chromium: nothing runs, no page error, and the strings show as text.
"""

import json

import pytest
import torch
from conftest import CharTokenizer, tiny_llama
from test_view_browser import CHROMIUM, browser  # noqa: F401 (browser is a fixture)
from test_views import HostileTokenizer, hostile_ids

from headlab.core.text import TextWindows
from headlab.probes import ReportSettings, write_report
from headlab.core.head_scores import HeadScores
from headlab.probes.validation.file import CURVE_FORMAT
from headlab.probes.validation.page import write_curve_page
from headlab.probes.views.data import gather_view
from headlab.probes.views.page import write_view
from headlab.sae import SparseAutoencoder, collect_examples, write_dashboard
from headlab.surgeon import HeadScale, Plan

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (CI installs it)"), pytest.mark.slow]

PAYLOADS = [
    '"><img src=x onerror="window.__pwned=1">',
    "</script><script>window.__pwned=2</script>",
    "' onmouseover='window.__pwned=3' x='",
    "<svg onload=window.__pwned=4>",
    "javascript:window.__pwned=5",
    "\u2028</div><iframe srcdoc=\"<script>parent.__pwned=6</script>\">",
    "</title></textarea></style></pre><img src=x onerror=\"window.__pwned=7\">",
]
HOSTILE = " ".join(PAYLOADS)


def load(browser, path):
    """Open ``path``; return the page and the errors it reported."""
    page = browser.new_page(viewport={"width": 1300, "height": 1600})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request",
            lambda r: errors.append(f"request {r.url}") if not r.url.startswith(("file:", "data:")) else None)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)
    return page, errors


def assert_inert(page, errors):
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img[src='x'], svg[onload], iframe").count() == 0
    assert errors == []


def hostile_curve(score: str) -> dict:
    """A masking validation whose score name, measure name and description, settings and responses are hostile."""
    row = {"top_mean": 0.4, "top_ci": [0.3, 0.5], "random_mean": 0.6, "random_ci": [0.5, 0.7],
           "random_set_means": [0.55, 0.65], "difference": 0.2, "difference_ci": [0.1, 0.3], "rank_p": 0.33,
           "paired_p": 0.04}
    return {"format": CURVE_FORMAT, "score": score, "metric": "loss", "mode": "zero", "n_items": 2, "n_used": 2,
            "settings": {"text_path": HOSTILE}, "measures": [{"name": HOSTILE, "higher_is_better": True,
                                                              "description": HOSTILE}],
            "k": [1, 2], "items": [{"response": HOSTILE, "used": True}], "heads": {}, "values": {},
            "summary": {HOSTILE: {"baseline_mean": 0.7, "by_k": {"1": row, "2": row}}}, "seconds": 1.0}


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory):
    """A report whose text file name, model id, tokens and masking curve's score name are hostile."""
    root = tmp_path_factory.mktemp("hostile")
    out = root / "report"
    out.mkdir()
    (out / f"validation-{'x'}.json").write_text(json.dumps(hostile_curve(PAYLOADS[0])))
    (out / "compression.json").write_text(json.dumps(hostile_compression(PAYLOADS[5], PAYLOADS[6])))
    (out / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1",
                                                         "entries": ["validation-x.json", "compression.json"]}))
    text = root / "tx<b>'\"t.txt"
    text.write_text((HOSTILE + " words of text ") * 8)
    settings = ReportSettings(text=TextWindows(windows=2, tokens=24, text_path=str(text)), seed=1, n_views=2,
                              families=("induction",))
    write_report(tiny_llama("gqa"), CharTokenizer(), HOSTILE, out, settings, progress=False)
    return out


def test_report_page_runs_nothing(browser, report_folder):  # noqa: F811
    page, errors = load(browser, report_folder / "report.html")
    assert_inert(page, errors)
    body = page.inner_text("body")
    assert PAYLOADS[0] in body and PAYLOADS[1] in body  # the model id and file name, shown as text
    assert page.locator(".plotly-graph-div").count() >= 3  # the masking curve of the hostile score renders
    assert page.locator("#masking table td", has_text=PAYLOADS[3]).count() == 2  # the measure name, per K
    assert page.locator("#compression .plotly-graph-div").count() == 1  # the hostile rule's curve renders


def test_report_views_page_runs_nothing(browser, report_folder):  # noqa: F811
    page, errors = load(browser, report_folder / "views.html")
    page.wait_for_selector(".headlab-view[data-ready='1']", timeout=60_000)
    assert_inert(page, errors)


def test_view_page_with_hostile_scores_plan_and_model_runs_nothing(browser, tmp_path):  # noqa: F811
    model = tiny_llama("gqa", layers=3)
    plan = Plan([HeadScale(1, (0, 3), 0.0)])
    data = gather_view(model, HostileTokenizer(), hostile_ids(30), HOSTILE, plan=plan, progress=False,
                       plan_label=PAYLOADS[2] + ".json")
    name = PAYLOADS[3]
    scores = {name: HeadScores(name, torch.rand(3, 9), torch.ones(3, 9), HOSTILE, PAYLOADS[1], {"x": HOSTILE})}
    path = write_view(data, tmp_path / "view.html", scores, head=(1, 0))
    page, errors = load(browser, path)
    page.wait_for_selector(".headlab-view[data-ready='1']", timeout=60_000)
    page.select_option(".hl-score", name)
    page.wait_for_timeout(300)
    assert_inert(page, errors)
    assert PAYLOADS[2] in page.inner_text(".hl-detail-title") or PAYLOADS[2] in page.content().replace("&amp;", "&")


def test_validation_page_runs_nothing(browser, tmp_path):  # noqa: F811
    path = write_curve_page(hostile_curve(PAYLOADS[1]), tmp_path / "validation.html")
    page, errors = load(browser, path)
    assert_inert(page, errors)
    assert PAYLOADS[1] in page.title()


def test_dashboard_runs_nothing(browser, tmp_path):  # noqa: F811
    model = tiny_llama("gqa", layers=2)
    sae = SparseAutoencoder(54, 32, "topk", 4, 9, 6)
    windows = [hostile_ids(12, seed=s) for s in range(2)]
    examples = collect_examples(model, sae, windows, 1, [0, 1], progress=False)
    tokens = [[HostileTokenizer().decode([i]) for i in w[0].tolist()] for w in windows]
    path = write_dashboard(tmp_path / "features.html", sae, examples, tokens, HOSTILE)
    page, errors = load(browser, path)
    assert_inert(page, errors)
    assert PAYLOADS[0] in page.title()


def hostile_compression(rule: str, model_id: str) -> dict:
    """A compression evaluation whose rule name and model id are hostile."""
    def row(name, keep, recall):
        return {"rule": name, "keep": keep, "length": 1024, "draws": 1, "full_heads": 9, "recall": recall,
                "recall_ci": [recall - 0.1, recall + 0.1], "rouge1_recall": recall, "loss": 2.0, "perplexity": 7.4,
                "kv_bytes": 2**20 * keep, "kv_fraction": keep, "seconds": 3.0}
    return {"format": "headlab-compression/1", "model_id": model_id, "settings": {}, "kv_heads": 90, "items": [],
            "runs": [], "summary": [row("full", 1.0, 0.6), row(rule, 0.1, 0.3), row(rule, 0.5, 0.5)]}


def test_compression_page_runs_nothing(browser, tmp_path):  # noqa: F811
    from headlab.probes.compression.page import write_compression_page

    path = write_compression_page(hostile_compression(PAYLOADS[1], PAYLOADS[0]), tmp_path / "compression.html")
    page, errors = load(browser, path)
    assert_inert(page, errors)
    assert PAYLOADS[0] in page.title()
    assert page.locator("table td", has_text=PAYLOADS[1]).count() == 2  # the rule, shown as text in its rows
    assert page.locator(".plotly-graph-div").count() == 1


def test_conversion_evaluation_pages_run_nothing(browser, tmp_path):  # noqa: F811
    """A converted checkpoint's evaluation whose checkpoint and base model names are hostile: its own
    page and the report's section that shows it."""
    from headlab.probes.compression.page import write_compression_page
    from headlab.probes.report.page import _compression_section

    result = {**hostile_compression("converted", PAYLOADS[0]), "kind": "conversion", "base_model": PAYLOADS[6]}
    page, errors = load(browser, write_compression_page(result, tmp_path / "compression.html"))
    assert_inert(page, errors)
    assert PAYLOADS[0] in page.title() and PAYLOADS[6] in page.title()
    assert page.locator("table td", has_text="base").count() == 1
    section = tmp_path / "section.html"
    from plotly.offline import get_plotlyjs

    section.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><script>{get_plotlyjs()}</script></head>"
                       f"<body>{_compression_section(result)}</body></html>")  # the report loads plotly.js once
    page, errors = load(browser, section)
    assert_inert(page, errors)
    assert PAYLOADS[6] in page.inner_text("#compression p")
    assert page.locator("#compression .plotly-graph-div").count() == 1
