"""Screenshots of every page kind for the documentation, from a folder where scripts/tour.py ran.

    .venv/bin/python scripts/tour.py --workdir /tmp/tour
    .venv/bin/python scripts/screenshots.py /tmp/tour [--out docs/images]

Each page opens in headless Chromium (Debian's, driven by Playwright) at 1,400 × 900 pixels; interactive
pages are shown after their script finished (the view on its opening head). The top of each page is
written as a JPEG into ``--out``, replacing only the screenshots this script names.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# (file in the tour's folder, screenshot name, what to wait for, how far down the page to start)
PAGES = [
    ("report/report.html", "report.jpg", "#overview", "body"),
    ("report/report.html", "report-section.jpg", "#score-retrieval .main-svg", "#score-retrieval"),
    ("view.html", "views.jpg", ".headlab-view[data-ready='1']", "body"),
    ("view.html", "views-map.jpg", ".headlab-view[data-ready='1']", ".hl-detail-title"),
    ("report/validation-retrieval.html", "validation.jpg", ".main-svg", "body"),
    ("kv/compression.html", "compression.jpg", ".main-svg", "body"),
    ("report/atlas.html", "atlas.jpg", ".main-svg", "body"),
    ("sae-l12/features.html", "sae-dashboard.jpg", "body", "body"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tour", help="the folder scripts/tour.py ran in")
    parser.add_argument("--out", default="docs/images", help="folder of the screenshots")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium on PATH (Debian: apt-get install chromium)")
    tour, out = Path(args.tour), Path(args.out)
    missing = [name for name, *_ in PAGES if not (tour / name).is_file()]
    if missing:
        raise SystemExit(f"{tour} has no {', '.join(missing)}: run scripts/tour.py --workdir {tour} first")
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        for name, shot, ready, top in PAGES:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto((tour / name).resolve().as_uri())
            page.wait_for_selector(ready, timeout=60_000)
            page.wait_for_timeout(500)
            page.evaluate(f"document.querySelector({top!r}).scrollIntoView()")
            page.screenshot(path=str(out / shot), type="jpeg", quality=80)
            page.close()
            print(f"written {out / shot}")
        browser.close()


if __name__ == "__main__":
    main()
