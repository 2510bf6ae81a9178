"""What every product's figure module shares: plotly.js for a page, a figure as an HTML div, the heatmap of
a score over every head, the colour scales of maps and differences, tokens as safe plotly labels, and
static export. With each product's ``figure`` module, the only place plotly is imported.

Every token string is HTML-escaped before it enters a figure, so a prompt containing markup renders as
text."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio
import torch

from ..core.escaping import element_id, plotly_text
from ..core.files import atomic_path
from ..core.head_scores import HeadScores


def display_token(token: str) -> str:
    """A token as safe, visible text for plotly labels: ``&``, ``<``, ``>`` escaped (plotly reads
    a small HTML subset in labels and shows quote entities literally), newlines and tabs shown as
    escapes."""
    return plotly_text(token.replace("\n", "\\n").replace("\t", "\\t"))


def colourise(values: torch.Tensor, diverging: bool = False) -> np.ndarray:
    """``[rows, cols]`` weights -> ``[rows, cols, 3]`` uint8 RGB on the Blues scale (0..max), or
    on the reversed RdBu scale symmetric about zero for differences."""
    values = values.double()
    if diverging:
        bound = float(values.abs().max()) or 1.0
        position, scale = (values / bound + 1) / 2, "RdBu_r"
    else:
        position, scale = values / (float(values.max()) or 1.0), "Blues"
    lut = np.array([plotly.colors.unlabel_rgb(c) for c in
                    plotly.colors.sample_colorscale(_SCALES[scale], [i / 255 for i in range(256)])], dtype=np.float64)
    index = position.clamp(0, 1).mul(255).round().long().numpy()
    return lut[index].round().astype(np.uint8)


_SCALES = {"Blues": plotly.colors.sequential.Blues, "RdBu_r": plotly.colors.diverging.RdBu_r}


def colour_scale(diverging: bool) -> list[list]:
    """The colour scale of maps (Blues) or differences (reversed RdBu) as ``[[position, colour]]``,
    spelled out because plotly.js gives the same names other colours."""
    colours = _SCALES["RdBu_r" if diverging else "Blues"]
    return [[i / (len(colours) - 1), c] for i, c in enumerate(colours)]


def export_figure(fig: go.Figure, path: str | Path, width: int | None = None, height: int | None = None) -> Path:
    """Write ``fig`` as a static PNG, SVG or PDF (by suffix) at a fixed size, headlessly (kaleido
    with the system's Chromium)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"static export writes .png, .svg or .pdf, not {path.name!r}")
    _find_chromium()
    with atomic_path(path) as tmp:
        fig.write_image(str(tmp), format=path.suffix[1:].lower(), width=width or fig.layout.width,
                        height=height or fig.layout.height)
    return path


def _find_chromium() -> None:
    if os.environ.get("BROWSER_PATH"):
        return
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            os.environ["BROWSER_PATH"] = found
            return
    raise FileNotFoundError("static export needs Chromium or Chrome (Debian: apt-get install chromium); "
                       "set BROWSER_PATH to its executable")


def figure_div(fig: go.Figure, *id_parts) -> str:
    """The figure as an HTML ``<div>`` fragment without plotly.js (the page includes it once); its
    element id is built from ``id_parts`` (:func:`~headlab.core.escaping.element_id`: a hostile
    score name cannot leave the attribute or plotly's script)."""
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=element_id(*id_parts))


def plotly_js() -> str:
    """The plotly.js bundle, to inline once per page so it opens offline."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def plotly_js_version() -> str:
    """Version of the bundled plotly.js (for a CDN link to the same build)."""
    from plotly.offline import get_plotlyjs_version

    return get_plotlyjs_version()


def score_heatmap(scores: HeadScores, n_kv_heads: int, top_k: int = 5) -> go.Figure:
    """A ``[layer, head]`` heatmap with the value in each cell; the top-k heads are outlined."""
    values = scores.values
    n_layers, n_heads = values.shape
    group = max(n_heads // n_kv_heads, 1)
    ranks = {(l, h): r + 1 for r, (l, h, _) in enumerate(scores.top(n_layers * n_heads))}
    hover = [
        [
            f"layer {l}, head {h} (KV group {h // group})<br>{plotly_text(scores.name)} = "
            + ("n/a" if math.isnan(values[l, h]) else f"{values[l, h]:.4f}")
            + f"<br>rank {ranks.get((l, h), '-')} of {n_layers * n_heads}, n = {int(scores.counts[l, h])}"
            for h in range(n_heads)
        ]
        for l in range(n_layers)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=values.tolist(),
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            text=[[f"{v:.2f}" if not math.isnan(v) else "" for v in row] for row in values.tolist()],
            texttemplate="%{text}",
            textfont={"size": 9},
            hovertext=hover,
            hoverinfo="text",
            colorscale="Viridis",
        )
    )
    for l, h, _ in scores.top(top_k):
        fig.add_shape(type="rect", x0=h - 0.5, x1=h + 0.5, y0=l - 0.5, y1=l + 0.5, line={"color": "red", "width": 2})
    fig.update_layout(
        title=plotly_text(scores.name),
        xaxis_title="head",
        yaxis_title="layer",
        height=max(300, 22 * n_layers + 120),
        width=max(420, 48 * n_heads + 200),
        margin={"t": 50, "l": 60, "r": 20, "b": 50},
    )
    return fig
