"""Attention views of SmolLM2-135M, opened in headless Chromium: screenshots and measurements.

    python examples/view_smollm2.py --out examples/results --pages results/views

Writes two pages into ``--pages`` and their screenshots into ``--out``: a short text with every head and a calibration plan to
compare (``view-short.html``: overview grid, before/after/difference map, a query's attention over
the text), and a 4096-token text of two layers (``view-long.html``: pooled image). ``views.json``
records per page the tokens, layers, pooling block, file size, recording time and browser load
time. Needs Chromium (scripts/setup.sh installs it as root) and Playwright (the test extra).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from headlab.core.text import load_text
from headlab.probes.views.data import gather_view
from headlab.probes.views.page import write_view
from headlab.surgeon import Calibrate, Plan, load_model
from headlab.core.files import write_json

SHORT_TEXT = (
    "The function returns a list of the unique words in the text. The function returns a list of the "
    "unique words in the text, sorted by frequency, so that the most common words come first."
)
PLAN = Plan([Calibrate(layer=18, heads=(3, 8), drop_first="none")])  # ACT on two sink-heavy heads


def measure_page(browser, path: Path, shots: dict[str, str], out: Path, click_query: float | None) -> float:
    """Open ``path``, wait until the page says it is drawn, optionally click a query row of the
    first map panel, and screenshot the elements in ``shots`` ({file name: selector})."""
    page = browser.new_page(viewport={"width": 1500, "height": 2400})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    start = time.perf_counter()
    page.goto(path.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    load_s = time.perf_counter() - start
    if click_query is not None:
        page.locator("#detail").scroll_into_view_if_needed()
        area = page.locator("#detail .nsewdrag").first.bounding_box()
        page.mouse.click(area["x"] + area["width"] * 0.3, area["y"] + area["height"] * click_query)
        page.wait_for_function("document.getElementById('tokens-title').textContent.startsWith('attention of')")
    for name, selector in shots.items():
        page.locator(selector).screenshot(path=str(out / name))
    if errors:
        raise RuntimeError(f"{path.name}: page errors {errors}")
    page.close()
    return load_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/results"), help="screenshots and views.json")
    parser.add_argument("--pages", type=Path, default=Path("results/views"), help="the HTML pages")
    parser.add_argument("--long-tokens", type=int, default=4096)
    parser.add_argument("--long-layers", default="17,18")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.pages.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("smollm2-135m")

    pages = {}
    short_ids = tokenizer(SHORT_TEXT, return_tensors="pt").input_ids
    start = time.perf_counter()
    short = gather_view(model, tokenizer, short_ids, "smollm2-135m", plan=PLAN, plan_label="ACT L18 H3,H8")
    short_path = write_view(short, args.pages / "view-short.html", head=(18, 8))
    pages["short"] = {"tokens": len(short.tokens), "layers": len(short.layers), "block": short.block,
                      "record_s": round(time.perf_counter() - start, 2)}

    long_ids = tokenizer(load_text(None), return_tensors="pt").input_ids[:, 5000:5000 + args.long_tokens]
    layers = [int(x) for x in args.long_layers.split(",")]
    start = time.perf_counter()
    long = gather_view(model, tokenizer, long_ids, "smollm2-135m", layers=layers)
    long_path = write_view(long, args.pages / "view-long.html", head=(layers[-1], 3))
    pages["long"] = {"tokens": len(long.tokens), "layers": len(long.layers), "block": long.block,
                     "record_s": round(time.perf_counter() - start, 2)}

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        pages["short"]["load_s"] = round(measure_page(
            browser, short_path, {"view-overview.png": "#overview", "view-detail.png": "#detail",
                                  "view-query-text.png": "#tokens"}, args.out, click_query=0.8), 2)
        pages["long"]["load_s"] = round(measure_page(
            browser, long_path, {"view-long.png": "#detail"}, args.out, click_query=None), 2)
        browser.close()
    for name, path in (("short", short_path), ("long", long_path)):
        pages[name]["file_mb"] = round(path.stat().st_size / 2**20, 2)
        pages[name]["file"] = path.name
    write_json(args.out / "views.json", {"model": "smollm2-135m", "machine": "2-core CPU, headless Chromium",
                                         "plotlyjs": "inline", "pages": pages})
    print(pages)


if __name__ == "__main__":
    main()
