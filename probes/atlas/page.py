"""The head atlas's page (``atlas.html``): the three embeddings, the hovered head's pooled map beside
them, the cluster table and the layer trends of locality. Clicking a head of the first model opens it
in the views page next to the atlas (``views.html#head=L.H``) when there is one. Every string from the
models, scores or clusters is escaped for where it lands."""

from __future__ import annotations

from pathlib import Path

from ...core.errors import InputFileError
from ...core.escaping import element_id, html_text, plotly_text, script_json
from ...core.files import GENERATOR_META, claim_folder, read_json_file, write_json, write_text
from ...core.kinds import Items, Kind, Text
from ...core.settings import check_object
from ..figures import figure_div, plotly_js
from .build import ATLAS_FORMAT
from .figure import atlas_figure, layer_trend_figure

METHODS = ("autoencoder", "pca", "tsne")

SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById('atlas-data').textContent);
  const side = document.getElementById('atlas-pooled');
  function show(index) {
    const [set, layer, head] = data.heads[index];
    Plotly.react(side, [{z: data.pooled[index], type: 'heatmap', colorscale: 'Viridis', showscale: false}],
      {title: {text: data.models[set] + ': layer ' + layer + ', head ' + head + ' (' + data.names[data.clusters[index]] + ')',
               font: {size: 12}},
       yaxis: {autorange: 'reversed', title: {text: 'query position (32 blocks)'}},
       xaxis: {title: {text: 'key position (32 blocks)'}}, width: 420, height: 440, margin: {t: 60}});
    side.dataset.shown = String(index);
  }
  for (const id of data.plots) {
    const plot = document.getElementById(id);
    plot.on('plotly_hover', function (event) {
      const point = event.points.find(p => p.customdata !== undefined);
      if (point) { show(point.customdata); }
    });
    plot.on('plotly_click', function (event) {
      const point = event.points.find(p => p.customdata !== undefined);
      if (!point || !data.views) { return; }
      const [set, layer, head] = data.heads[point.customdata];
      if (set === 0) { window.location.href = data.views + '#head=' + layer + '.' + head; }
    });
  }
  show(0);
})();
"""


def atlas_page_html(doc: dict, views_href: str | None = None) -> str:
    """The page of an atlas document; ``views_href``: the views page its heads open in (or None)."""
    plots = [element_id("atlas", method) for method in METHODS if method in doc["points"]]
    figures = "".join(figure_div(atlas_figure(doc, method), "atlas", method) for method in METHODS
                      if method in doc["points"])
    data = {"heads": doc["heads"], "pooled": doc["pooled"], "clusters": doc["clusters"],
            "names": [plotly_text(n) for n in doc["names"]], "models": [plotly_text(m) for m in doc["models"]],
            "plots": plots, "views": views_href}
    title = html_text("head atlas: " + " vs ".join(doc["models"]))
    return "".join([
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR_META}<title>{title}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}.row{display:flex;flex-wrap:wrap;gap:8px}</style>",
        f"<script>{plotly_js()}</script></head><body><h1>{title}</h1>",
        "<p>Every head is a point: heads with similar attention patterns (locality profile, first-token and "
        "hidden-sink mass, entropy distribution, pooled map) sit together. Hover a head to see its pooled map. "
        + ("click a head of the first model to open it in the views page. " if views_href else "")
        + "The menu above each plot recolours the heads by cluster, layer or a score; marker shapes tell the "
        "models apart, and grey lines join a head's two positions in a comparison.</p>",
        f"<div class='row'>{figures}<div id='atlas-pooled' data-shown=''></div></div>",
        cluster_table_html(doc),
        figure_div(layer_trend_figure(doc), "atlas", "trends"),
        f"<script type='application/json' id='atlas-data'>{script_json(data)}</script>",
        f"<script>{SCRIPT}</script></body></html>",
    ])


def cluster_table_html(doc: dict) -> str:
    """The clusters: name, size, example heads, and the mean of each score with its separation (η²)."""
    table = doc["cluster_table"]
    names = sorted(table[0]["score_means"]) if table else []
    separation = table[0]["separation"] if table else {}
    head = "".join(f"<th>{html_text(n)} (η² {_number(separation.get(n))})</th>" for n in names)
    rows = []
    for row in table:
        examples = ", ".join(f"{html_text(doc['models'][s])} L{l}.H{h}" for s, l, h in row["examples"])
        cells = "".join(f"<td>{_number(row['score_means'][n])}</td>" for n in names)
        rows.append(f"<tr><td>{html_text(row['name'])}</td><td>{row['size']}</td><td>{examples}</td>{cells}</tr>")
    return ("<h2>Clusters</h2><table><tr><th>cluster</th><th>heads</th><th>nearest the centre</th>"
            f"{head}</tr>{''.join(rows)}</table>")


def load_atlas(folder: str | Path) -> dict | None:
    """``folder / atlas.json`` (None when there is none), checked: a damaged or foreign file is one
    :class:`InputFileError` naming it."""
    path = Path(folder) / "atlas.json"
    if not path.exists():
        return None
    doc = read_json_file(path, "head atlas", ATLAS_FORMAT)
    listed = Items(Kind(), unique=False, min_items=1)
    check_object(doc, str(path), {"format": Text(), "models": Items(Text(), unique=False), "heads": listed,
                                  "points": Kind(), "clusters": listed, "names": Items(Text(), unique=False),
                                  "scores": Kind(), "pooled": listed, "layer_trends": Kind(),
                                  "cluster_table": listed},
                 {"settings": Kind(), "first": Kind(), "hidden_sinks": Kind(), "median_distance": Kind(),
                  "locality": Kind(), "displacement": Kind()})
    n = len(doc["heads"])
    if any(len(doc[key]) != n for key in ("clusters", "pooled")) or \
            any(len(points) != n for points in doc["points"].values()):
        raise InputFileError(f"{path}: its heads, points, clusters and maps do not have one entry each")
    return doc


def atlas_section(doc: dict | None) -> str:
    """The report's section: the autoencoder embedding, the clusters and the layer trends, or how to
    make them."""
    head = "<section id='atlas'><h2>Head atlas</h2>"
    if doc is None:
        return (head + "<p>No atlas in this folder yet: run <code>headlab atlas MODEL --scores scores.json --out "
                ".</code> here, then <code>headlab report MODEL --out . --page-only</code> writes this page "
                "again (no scoring).</p></section>")
    return (head + "<p>Every head as a point of the autoencoder's embedding of its attention pattern; hover, "
            "the other embeddings and the pooled maps are in <a href='atlas.html'>atlas.html</a>.</p>"
            + figure_div(atlas_figure(doc, "autoencoder"), "report-atlas")
            + cluster_table_html(doc)
            + figure_div(layer_trend_figure(doc), "report-atlas", "trends") + "</section>")


def _number(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_atlas(out: str | Path, doc: dict, overwrite: bool = False) -> Path:
    """Write ``atlas.json`` and ``atlas.html`` into ``out`` (claimed first); returns the folder."""
    out = claim_folder(out, ("atlas.json", "atlas.html"), overwrite, "--out folder")
    write_json(out / "atlas.json", doc)
    write_atlas_page(doc, out / "atlas.html")
    return out


def write_atlas_page(doc: dict, path: str | Path) -> Path:
    """Write the page; heads open in ``views.html`` when one sits beside it."""
    path = Path(path)
    views_href = "views.html" if (path.parent / "views.html").exists() else None
    return write_text(path, atlas_page_html(doc, views_href))


__all__ = ["atlas_page_html", "atlas_section", "cluster_table_html", "load_atlas", "write_atlas", "write_atlas_page"]
