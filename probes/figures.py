"""What every product's figure module shares: plotly.js for a page (one file beside the pages, inlined, or
from the CDN) and for a notebook output, a figure as an HTML div, the heatmap of a score over every head,
the colour scales of maps and differences with their saturation, palette PNG images, tokens as safe plotly
labels, and static export. With each product's ``figure`` module, the only place plotly is imported.

Every token string is HTML-escaped before it enters a figure, so a prompt containing markup renders as
text."""

from __future__ import annotations

import math
import os
import shutil
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio
import torch

from ..core.errors import OutputError
from ..core.escaping import element_id, html_attribute, plotly_text
from ..core.files import atomic_path, owned_entries, record_owned, write_text
from ..core.head_scores import HeadScores

PLOTLY_SOURCES = ("file", "inline", "cdn")  # where a page's plotly.js comes from (``plotlyjs`` of every page writer)
PAGE_WIDTH = 1040  # the widest figure a page holds: wider ones would push the page sideways
SATURATION = 0.995  # map colours saturate at this quantile of a panel's nonzero |weights|


def display_token(token: str) -> str:
    """A token as safe, visible text for plotly labels: ``&``, ``<``, ``>`` escaped (plotly reads
    a small HTML subset in labels and shows quote entities literally), newlines and tabs shown as
    escapes."""
    return plotly_text(token.replace("\n", "\\n").replace("\t", "\\t"))


_SCALES = {"Blues": plotly.colors.sequential.Blues, "RdBu_r": plotly.colors.diverging.RdBu_r,
           "Viridis": plotly.colors.sequential.Viridis}


def colour_lut(scale: str) -> np.ndarray:
    """``[256, 3]`` uint8 RGB: the named scale (``Blues``, ``RdBu_r``, ``Viridis``) sampled at 256 evenly
    spaced positions, interpolated in RGB between its stops as plotly.js does."""
    stops = plotly.colors.sample_colorscale(_SCALES[scale], [i / 255 for i in range(256)])
    return np.array([plotly.colors.unlabel_rgb(c) for c in stops], dtype=np.float64).round().astype(np.uint8)


def saturation_bound(values: torch.Tensor) -> float:
    """The :data:`SATURATION` quantile of the nonzero ``|values|`` (1.0 when all are zero): where a
    map's colours saturate, so that a sink holding a row's whole weight does not wash out the rest."""
    nonzero = values.abs().flatten()
    nonzero = nonzero[nonzero > 0].double()
    if not nonzero.numel():
        return 1.0
    ordered = nonzero.sort().values
    return float(ordered[min(len(ordered) - 1, math.floor(SATURATION * len(ordered)))])


def colour_indices(values: torch.Tensor, diverging: bool = False, bound: float | None = None) -> np.ndarray:
    """``[rows, cols]`` weights -> ``[rows, cols]`` uint8 positions on a 256-colour scale: ``values /
    bound`` (0..bound), or ``(values / bound + 1) / 2`` symmetric about zero for differences, clamped;
    ``bound`` defaults to the largest ``|value|``."""
    values = values.double()
    bound = bound or float(values.abs().max()) or 1.0
    position = (values / bound + 1) / 2 if diverging else values / bound
    return position.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def colourise(values: torch.Tensor, diverging: bool = False, bound: float | None = None) -> np.ndarray:
    """``[rows, cols]`` weights -> ``[rows, cols, 3]`` uint8 RGB on the Blues scale (0..bound), or on
    the reversed RdBu scale symmetric about zero for differences (:func:`colour_indices`)."""
    return colour_lut("RdBu_r" if diverging else "Blues")[colour_indices(values, diverging, bound)]


def scale_stops(scale: str) -> list[list]:
    """The named scale (``Blues``, ``RdBu_r``, ``Viridis``) as ``[[position, colour]]``, spelled out
    because plotly.js gives some of these names other colours."""
    colours = _SCALES[scale]
    return [[i / (len(colours) - 1), c] for i, c in enumerate(colours)]


def colour_scale(diverging: bool) -> list[list]:
    """The colour scale of maps (Blues) or differences (reversed RdBu) (:func:`scale_stops`)."""
    return scale_stops("RdBu_r" if diverging else "Blues")


def png_image(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """An 8-bit palette PNG file of ``indices [height, width]`` (uint8) into ``palette [colours, 3]``
    (uint8, at most 256 colours), without an imaging library: one byte a pixel, so a map of a few
    colours compresses well."""
    height, width = indices.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), indices.astype(np.uint8)], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", palette.astype(np.uint8).tobytes())
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


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
    """The plotly.js bundle (about 4.7 MB), for a page that carries its own copy."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def plotly_js_version() -> str:
    """Version of the bundled plotly.js (it names the shared file and the CDN link)."""
    from plotly.offline import get_plotlyjs_version

    return get_plotlyjs_version()


def plotly_file_name() -> str:
    """The name of the shared plotly.js file pages link, ``plotly-<version>.min.js``."""
    return f"plotly-{plotly_js_version()}.min.js"


def check_plotly_source(folder: str | Path, plotlyjs: str = "file") -> Path:
    """Check, before any work, that pages written into ``folder`` can get plotly.js as ``plotlyjs`` says
    (:func:`plotly_script`): a known source, and for ``"file"`` no file of the shared file's name there
    that headlab did not write (the folder's ownership manifest) and that is not this bundle, which
    headlab never overwrites (:class:`~headlab.core.errors.OutputError`). Returns the shared file's path."""
    if plotlyjs not in PLOTLY_SOURCES:
        raise ValueError(f"plotlyjs must be one of {', '.join(PLOTLY_SOURCES)}, not {plotlyjs!r}")
    path = Path(folder) / plotly_file_name()
    if plotlyjs == "file" and path.exists() and path.name not in owned_entries(folder) and not _holds_bundle(path):
        raise OutputError(f"{path} exists and headlab did not write it; move it away, or write the pages with "
                          "plotly.js inlined (plotlyjs='inline')")
    return path


def _holds_bundle(path: Path) -> bool:
    bundle = plotly_js().encode("utf-8")
    return path.is_file() and path.stat().st_size == len(bundle) and path.read_bytes() == bundle


def plotly_script(folder: str | Path, plotlyjs: str = "file") -> str:
    """The ``<script>`` element that gives a page written into ``folder`` plotly.js. ``plotlyjs``:
    ``"file"`` links :func:`plotly_file_name` beside the page, written once (atomically, recorded as
    headlab's in the folder) and shared by every page there, so a page carries only its data, and
    it opens offline; ``"inline"`` puts the bundle in the page (one self-contained file, +4.7 MB);
    ``"cdn"`` links cdn.plot.ly (the page then needs the network)."""
    path = check_plotly_source(folder, plotlyjs)
    if plotlyjs == "inline":
        return f"<script>{plotly_js()}</script>"
    if plotlyjs == "cdn":
        return f"<script src='https://cdn.plot.ly/plotly-{plotly_js_version()}.min.js'></script>"
    if not _holds_bundle(path):
        write_text(path, plotly_js())
        record_owned(folder, [path.name])
    return f"<script src='{html_attribute(path.name)}'></script>"


@dataclass(frozen=True)
class NotebookHTML:
    """HTML for one notebook output cell, which Jupyter shows through :meth:`_repr_html_`."""

    html: str

    def _repr_html_(self) -> str:
        """The output's HTML."""
        return self.html


def notebook_html(body: str) -> NotebookHTML:
    """``body`` as a self-contained notebook output: plotly.js travels with every output (it runs only
    where the notebook has none yet), so the output renders alone, in an isolated frame and in a
    static HTML export of the notebook. ``body`` must use ids from :func:`output_id`."""
    return NotebookHTML(f"<script>if (!window.Plotly) {{\n{plotly_js()}\n}}</script>{body}")


def output_id(kind: str) -> str:
    """A fresh element id for one notebook output (two outputs of one notebook share a document)."""
    return element_id(kind, uuid.uuid4().hex[:12])


def value_label(name: str, description: str, limit: int = 60) -> str:
    """What a score's values are, for its colour bar: its name and the first clause of its description,
    cut to ``limit`` characters (plain text: escape it for its context)."""
    clause = description.split("; ")[0].split(", ")[0].split(" (")[0].strip()
    label = f"{name}: {clause}" if clause else name
    return label if len(label) <= limit else label[:limit - 1].rstrip() + "\u2026"


def score_heatmap(scores: HeadScores, n_kv_heads: int, top_k: int = 5) -> go.Figure:
    """A ``[layer, head]`` heatmap with the value in each cell (where cells are wide enough to hold it),
    the colour bar titled with what the value is, the top-k heads outlined; hover gives each head's
    value, rank, KV group and sample count."""
    values = scores.values
    n_layers, n_heads = values.shape
    group = max(n_heads // n_kv_heads, 1)
    ranks = {(l, h): r + 1 for r, (l, h, _) in enumerate(scores.top(n_layers * n_heads))}
    details = [[[ranks.get((l, h), "-"), h // group, int(scores.counts[l, h])] for h in range(n_heads)]
               for l in range(n_layers)]
    width = min(PAGE_WIDTH, max(420, 48 * n_heads + 220))
    height = max(300, 22 * n_layers + 120)
    legible = (width - 220) / n_heads >= 30
    fig = go.Figure(go.Heatmap(
        z=values.tolist(), x=list(range(n_heads)), y=list(range(n_layers)),
        text=[[f"{v:.2f}" if not math.isnan(v) else "" for v in row] for row in values.tolist()],
        texttemplate="%{text}" if legible else None, textfont={"size": 9}, customdata=details,
        hovertemplate=f"layer %{{y}}, head %{{x}} (KV group %{{customdata[1]}})<br>{plotly_text(scores.name)} = "
                      f"%{{z:.4f}}<br>rank %{{customdata[0]}} of {n_layers * n_heads}, n = %{{customdata[2]}}"
                      "<extra></extra>",
        colorscale="Viridis",
        colorbar={"title": {"text": plotly_text(value_label(scores.name, scores.description, (height - 40) // 7)), "side": "right"}}))
    for l, h, _ in scores.top(top_k):
        fig.add_shape(type="rect", x0=h - 0.5, x1=h + 0.5, y0=l - 0.5, y1=l + 0.5, line={"color": "red", "width": 2})
    fig.update_layout(title=plotly_text(scores.name), xaxis={"title": "head", "dtick": 1 if n_heads <= 40 else None},
                      yaxis={"title": "layer", "dtick": 1 if n_layers <= 40 else None}, height=height, width=width,
                      margin={"t": 50, "l": 60, "r": 20, "b": 50})
    return fig
