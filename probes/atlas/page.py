"""The head atlas's page (``atlas.html``): the three embeddings with a legend of the clusters, the hovered
head's pooled map beside them, the cluster table and the layer trends of locality, each under its heading;
the same as a notebook output (:func:`show_atlas`). Clicking a head of the first model opens it in the views
page next to the atlas (``views.html#head=L.H``) when there is one. Every string from the models, scores or
clusters is escaped for where it lands."""

from __future__ import annotations

from pathlib import Path

from ...core.errors import InputFileError
from ...core.escaping import element_id, html_text, plotly_text, script_json
from ...core.files import GENERATOR_META, claim_folder, read_json_file, write_json, write_text
from ...core.kinds import Items, Kind, Text
from ...core.settings import check_object
from ..figures import NotebookHTML, check_plotly_source, figure_div, notebook_html, output_id, plotly_script
from .build import ATLAS_FORMAT
from .figure import atlas_figure, layer_trend_figure

METHODS = ("autoencoder", "pca", "tsne")

SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById('DATA_ID').textContent);
  const side = document.getElementById(data.side);
  function show(index) {
    const [set, layer, head] = data.heads[index];
    Plotly.react(side, [{z: data.pooled[index], type: 'heatmap', colorscale: 'Viridis',
                        colorbar: {title: {text: 'mean attention weight', side: 'right'}}}],
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


STYLE = (".atlas{font-family:system-ui,sans-serif}.atlas table{border-collapse:collapse}"
         ".atlas td,.atlas th{border:1px solid #ccc;padding:3px 8px}.atlas .row{display:flex;flex-wrap:wrap;gap:8px}"
         ".atlas .figure,.atlas .table-box{max-width:100%;overflow-x:auto}")


def atlas_page_html(doc: dict, script: str, views_href: str | None = None) -> str:
    """The page of an atlas document; ``script`` gives it plotly.js
    (:func:`~headlab.probes.figures.plotly_script`), ``views_href`` the views page its heads open in
    (or None)."""
    title = html_text("head atlas: " + " vs ".join(doc["models"]))
    return "".join([
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR_META}<title>{title}</title>",
        f"<style>body{{margin:1.5em}}{STYLE}</style>{script}</head><body><h1>{title}</h1>", atlas_body(doc, views_href),
        "</body></html>"])


def atlas_body(doc: dict, views_href: str | None = None, id_prefix: str = "atlas") -> str:
    """The atlas without its page: the embeddings beside the hovered head's pooled map, the clusters and
    the layer trends, each under its heading, and the script; element ids start with ``id_prefix``."""
    plots = [element_id(id_prefix, method) for method in METHODS if method in doc["points"]]
    figures = "".join(figure_div(atlas_figure(doc, method), id_prefix, method) for method in METHODS
                      if method in doc["points"])
    data = {"heads": doc["heads"], "pooled": doc["pooled"], "clusters": doc["clusters"],
            "names": [plotly_text(n) for n in doc["names"]], "models": [plotly_text(m) for m in doc["models"]],
            "plots": plots, "views": views_href, "side": element_id(id_prefix, "pooled")}
    return "".join([
        "<div class='atlas'><h2>Embeddings</h2><p>Every head is a point: heads with similar attention patterns (locality profile, "
        "first-token and hidden-sink mass, entropy distribution, pooled map) sit together; the axes are each "
        "embedding's two coordinates, without units. Hover a head to see its pooled map"
        + (", click a head of the first model to open it in the views page" if views_href else "")
        + ". The legend names the clusters (click an entry to hide it); the menu above each plot recolours the "
        "heads by cluster, layer or a score; marker shapes tell the models apart, and grey lines join a head's "
        "two positions in a comparison.</p>",
        f"<div class='row'>{figures}<div id='{element_id(id_prefix, 'pooled')}' data-shown=''></div></div>",
        "<h2>Clusters</h2>", cluster_table_html(doc),
        "<h2>Locality by layer</h2><div class='figure'>", figure_div(layer_trend_figure(doc), id_prefix, "trends"),
        "</div>",
        f"<script type='application/json' id='{element_id(id_prefix, 'data')}'>{script_json(data)}</script>",
        f"<script>{SCRIPT.replace('DATA_ID', element_id(id_prefix, 'data'))}</script></div>",
    ])


def cluster_table_html(doc: dict) -> str:
    """The clusters: name, size, example heads, and the mean of each score with its separation (η²), in a
    box that scrolls sideways when the scores make it wider than the page."""
    table = doc["cluster_table"]
    names = sorted(table[0]["score_means"]) if table else []
    separation = table[0]["separation"] if table else {}
    head = "".join(f"<th>{html_text(n)} (η² {_number(separation.get(n))})</th>" for n in names)
    rows = []
    for row in table:
        examples = ", ".join(f"{html_text(doc['models'][s])} L{l}.H{h}" for s, l, h in row["examples"])
        cells = "".join(f"<td>{_number(row['score_means'][n])}</td>" for n in names)
        rows.append(f"<tr><td>{html_text(row['name'])}</td><td>{row['size']}</td><td>{examples}</td>{cells}</tr>")
    return ("<div class='table-box'><table><tr><th>cluster</th><th>heads</th><th>nearest the centre</th>"
            f"{head}</tr>{''.join(rows)}</table></div>")


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
    """The report's section: the autoencoder embedding, the clusters and the layer trends, each under its
    heading, or how to make them."""
    head = "<section id='atlas'><h2>Head atlas</h2>"
    if doc is None:
        return (head + "<p>No atlas in this folder yet: run <code>headlab atlas MODEL --scores scores.json --out "
                ".</code> here, then <code>headlab report MODEL --out . --page-only</code> writes this page "
                "again (no scoring).</p></section>")
    return (head + "<p>Every head as a point of the autoencoder's embedding of its attention pattern (the axes are "
            "its two coordinates), coloured by cluster; hover, the other embeddings and the pooled maps are in "
            "<a href='atlas.html'>atlas.html</a>.</p><h3>Embedding</h3><div class='figure'>"
            + figure_div(atlas_figure(doc, "autoencoder"), "report-atlas") + "</div><h3>Clusters</h3>"
            + cluster_table_html(doc) + "<h3>Locality by layer</h3><div class='figure'>"
            + figure_div(layer_trend_figure(doc), "report-atlas", "trends") + "</div></section>")


def show_atlas(doc: dict) -> NotebookHTML:
    """An atlas document (``atlas.json``'s contents, :func:`load_atlas`) as a notebook output: the
    embeddings with the hovered head's pooled map, the clusters and the layer trends, self-contained."""
    return notebook_html(f"<style>{STYLE}</style>" + atlas_body(doc, None, output_id("atlas")))


def _number(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_atlas(out: str | Path, doc: dict, overwrite: bool = False, plotlyjs: str = "file") -> Path:
    """Write ``atlas.json`` and ``atlas.html`` into ``out`` (claimed first; ``plotlyjs`` as in
    :func:`~headlab.probes.figures.plotly_script`); returns the folder."""
    check_plotly_source(out, plotlyjs)
    out = claim_folder(out, ("atlas.json", "atlas.html"), overwrite, "--out folder")
    write_json(out / "atlas.json", doc)
    write_atlas_page(doc, out / "atlas.html", plotlyjs)
    return out


def write_atlas_page(doc: dict, path: str | Path, plotlyjs: str = "file") -> Path:
    """Write the page (plotly.js as ``plotlyjs`` says); heads open in ``views.html`` when one sits beside it."""
    path = Path(path)
    views_href = "views.html" if (path.parent / "views.html").exists() else None
    return write_text(path, atlas_page_html(doc, plotly_script(path.parent, plotlyjs), views_href))


__all__ = ["atlas_body", "atlas_page_html", "atlas_section", "cluster_table_html", "load_atlas", "show_atlas",
           "write_atlas", "write_atlas_page"]
