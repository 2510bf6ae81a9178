"""Plotly figures of head scores and attention maps (the only module that imports plotly).

Every token string is HTML-escaped before it enters a figure, so a prompt containing markup
renders as text.
"""

from __future__ import annotations

import base64
import math
import os
import shutil
from pathlib import Path

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.subplots import make_subplots

from ..core.escaping import element_id, plotly_text
from ..core.files import atomic_path
from .record import AttentionRecord
from ..core.head_scores import HeadScores
from .view_data import ViewData, png_rgb, view_data_from_record

def display_token(token: str) -> str:
    """A token as safe, visible text for plotly labels: ``&``, ``<``, ``>`` escaped (plotly reads
    a small HTML subset in labels and shows quote entities literally), newlines and tabs shown as
    escapes."""
    return plotly_text(token.replace("\n", "\\n").replace("\t", "\\t"))


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


def view(data: ViewData | AttentionRecord, layer: int | None = None, head: int | None = None,
         compare: AttentionRecord | None = None, score: str = "previous_token",
         scores: dict[str, HeadScores] | None = None) -> go.Figure:
    """A plotly figure of recorded attention: the layers × heads overview coloured by ``score``
    (a pattern score of the record, or a name in ``scores``, e.g. a report's scores.json), or,
    with ``layer`` and ``head``, that head's map (side by side with ``compare``, the same input
    after surgery, and their difference). Shows in Jupyter; ``write_html``/:func:`export_figure`
    save it."""
    if isinstance(data, AttentionRecord):
        data = view_data_from_record(data, compare=compare)
    if layer is None and head is None:
        return overview_figure(data, score, scores)
    if layer is None or head is None:
        raise ValueError("give both layer and head for a head view, or neither for the overview")
    return head_figure(data, layer, head)


def overview_figure(data: ViewData, score: str = "previous_token",
                    scores: dict[str, HeadScores] | None = None) -> go.Figure:
    """Layers × heads heatmap of one per-head score; heads outside the view are blank."""
    if scores and score in scores:
        values = scores[score].values
    elif score in data.scores:
        values = data.scores[score]
    else:
        known = sorted(set(data.scores) | set(scores or {}))
        raise ValueError(f"unknown score {score!r}; available: {', '.join(known)}")
    shown = values.clone()
    viewed = torch.zeros_like(shown, dtype=torch.bool)
    for layer, head in data.before:
        viewed[layer, head] = True
    shown[~viewed] = math.nan
    result = HeadScores(score, shown, viewed.long(), data.model_id)
    fig = score_heatmap(result, data.n_kv_heads)
    fig.update_layout(title=f"{plotly_text(score)}: {plotly_text(data.model_id)} ({len(data.tokens)} tokens)")
    return fig


def head_figure(data: ViewData, layer: int, head: int) -> go.Figure:
    """The map of one head: a token heatmap when ``data.block == 1``, else a pooled image; with a
    plan, before | after | after − before."""
    panels = [("before surgery" if data.after is not None else "attention", data.pooled(layer, head))]
    if data.after is not None:
        after = data.pooled(layer, head, compare=True)
        panels += [("after surgery", after), ("after − before", after - panels[0][1])]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels],
                        horizontal_spacing=0.06, shared_yaxes=True)
    for col, (title, values) in enumerate(panels, start=1):
        diverging = title == "after − before"
        trace = _token_heatmap(data, values, diverging) if data.block == 1 else _block_image(data, values, diverging)
        fig.add_trace(trace, row=1, col=col)
    _label_axes(fig, data, len(panels))
    plan = f", plan {plotly_text(data.plan_name)}" if data.plan_name else ""
    fig.update_layout(title=f"layer {layer}, head {head}{plan}: {plotly_text(data.model_id)}",
                      width=min(1800, 120 + 660 * len(panels)), height=780,
                      margin={"t": 80, "l": 150, "r": 20, "b": 150})
    return fig


def _token_heatmap(data: ViewData, values: torch.Tensor, diverging: bool) -> go.Heatmap:
    labels = [f"{i}: {display_token(t)}" for i, t in enumerate(data.tokens)]
    bound = float(values.abs().max()) or 1.0
    colour = {"colorscale": colour_scale(True), "zmin": -bound, "zmax": bound} if diverging \
        else {"colorscale": colour_scale(False), "zmin": 0}
    return go.Heatmap(z=values.double().mul(1e5).round().div(1e5).tolist(), x=labels, y=labels,
                      hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.5f}<extra></extra>",
                      showscale=not diverging, **colour)


def _block_image(data: ViewData, values: torch.Tensor, diverging: bool) -> go.Image:
    pixels = colourise(values, diverging)
    source = "data:image/png;base64," + base64.b64encode(png_rgb(pixels)).decode("ascii")
    return go.Image(source=source, hovertemplate="query block %{y}<br>key block %{x}<extra></extra>")


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


def _label_axes(fig: go.Figure, data: ViewData, n_panels: int) -> None:
    if data.block == 1:
        note = "token"
        options = {"type": "category", "tickangle": -60}
    else:
        note = f"token block ({data.block} tokens per block, mean weight)"
        side = data.pooled(*next(iter(data.before))).shape[-1]
        ticks = list(range(0, side, max(1, side // 8)))
        options = {"tickvals": ticks, "ticktext": [f"{t * data.block}" for t in ticks]}
    for col in range(1, n_panels + 1):
        fig.update_xaxes(title_text=f"key {note}", row=1, col=col, **options)
    fig.update_yaxes(title_text=f"query {note}", autorange="reversed", row=1, col=1, **options)


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


def masking_figure(curve: dict) -> go.Figure:
    """One panel per measure: the measure against the number of masked heads, for the top-K heads
    of the score and for the random sets (their mean, and each set's mean as a faint point), with
    95% bootstrap intervals over the prompts, the unmasked mean as a dashed line, and both tests'
    p-values in the hover text."""
    measures = curve["measures"]
    ks = sorted(curve["k"])
    fig = make_subplots(rows=1, cols=len(measures), subplot_titles=[plotly_text(m["name"]) for m in measures])
    for col, measure in enumerate(measures, start=1):
        summary = curve["summary"][measure["name"]]
        rows = [summary["by_k"][str(k)] for k in ks if str(k) in summary["by_k"]]
        shown = ks[:len(rows)]
        first = col == 1
        if summary["baseline_mean"] is not None:
            fig.add_trace(go.Scatter(x=[0, *shown], y=[summary["baseline_mean"]] * (len(shown) + 1), mode="lines",
                                     name="unmasked", line={"color": "#555", "dash": "dash"}, showlegend=first,
                                     legendgroup="unmasked"), row=1, col=col)
        hover = [f"K={k}<br>rank p={r['rank_p']:.3g}<br>paired p={r['paired_p']:.3g}<br>"
                 f"difference {r['difference']:.3g} [{r['difference_ci'][0]:.3g}, {r['difference_ci'][1]:.3g}]"
                 for k, r in zip(shown, rows)]
        for kind, color, label in (("top", "#d62728", f"top-K by {plotly_text(curve['score'])}"),
                                   ("random", "#1f77b4", "random-K, matched by layer (mean of sets)")):
            means = [r[f"{kind}_mean"] for r in rows]
            intervals = [r[f"{kind}_ci"] for r in rows]
            fig.add_trace(go.Scatter(
                x=shown, y=means, mode="lines+markers", name=label, line={"color": color}, showlegend=first,
                legendgroup=kind, hovertext=hover, hoverinfo="text+y",
                error_y={"type": "data", "symmetric": False, "array": [hi - m for m, (_, hi) in zip(means, intervals)],
                         "arrayminus": [m - lo for m, (lo, _) in zip(means, intervals)]}), row=1, col=col)
        fig.add_trace(go.Scatter(
            x=[k for k, r in zip(shown, rows) for _ in r["random_set_means"]],
            y=[v for r in rows for v in r["random_set_means"]], mode="markers", name="random-K, each set",
            marker={"color": "#1f77b4", "opacity": 0.3, "size": 6}, showlegend=first, legendgroup="sets"),
            row=1, col=col)
        fig.update_xaxes(title_text="heads masked (K)", row=1, col=col)
    fig.update_layout(title=f"masking validation of {plotly_text(curve['score'])} ({curve['metric']}, {curve['mode']} "
                            f"masking, {curve['n_used']} of {curve['n_items']} items; bars: 95% bootstrap intervals)",
                      width=max(520, 420 * len(measures)), height=440)
    return fig


RULE_COLOURS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def compression_figure(result: dict) -> go.Figure:
    """KV-cache compression by streaming heads: needle recall (top row, 95% bootstrap intervals)
    and perplexity (bottom row) against the fraction of KV heads that keep the whole context, one
    column per length, one line per selection rule (random: the mean of its draws, in grey), the
    unedited model as a dashed line. A converted checkpoint's evaluation: its points against its
    base model's dashed line."""
    from .compression_file import FULL, compression_title, is_conversion

    reference = "base model" if is_conversion(result) else "unedited"
    rows = result["summary"]
    lengths = sorted({row["length"] for row in rows})
    rules = list(dict.fromkeys(row["rule"] for row in rows if row["rule"] != FULL))
    fig = make_subplots(rows=2, cols=len(lengths), shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{length} tokens" for length in lengths] + [""] * len(lengths))
    for col, length in enumerate(lengths, start=1):
        full = [row for row in rows if row["rule"] == FULL and row["length"] == length]
        for r, measure in enumerate(("recall", "perplexity"), start=1):
            if full:
                fig.add_trace(go.Scatter(x=[0, 1], y=[full[0][measure]] * 2, mode="lines", name=reference,
                                         line={"color": "#555", "dash": "dash"}, legendgroup="full",
                                         showlegend=col == 1 and r == 1), row=r, col=col)
            for i, rule in enumerate(rules):
                points = sorted((row for row in rows if row["rule"] == rule and row["length"] == length),
                                key=lambda row: row["keep"])
                colour = "#7f7f7f" if rule == "random" else RULE_COLOURS[i % len(RULE_COLOURS)]
                hover = [f"{plotly_text(rule)}, keep {p['keep']:.0%} ({p['full_heads']} KV heads)<br>"
                         f"KV cache {p['kv_fraction']:.0%} of the {reference}" if p["kv_fraction"] is not None else
                         plotly_text(rule) for p in points]
                error = None
                if measure == "recall":
                    error = {"type": "data", "symmetric": False,
                             "array": [p["recall_ci"][1] - p["recall"] for p in points],
                             "arrayminus": [p["recall"] - p["recall_ci"][0] for p in points]}
                fig.add_trace(go.Scatter(x=[p["keep"] for p in points], y=[p[measure] for p in points],
                                         mode="lines+markers", name=plotly_text(rule), line={"color": colour},
                                         error_y=error, hovertext=hover, hoverinfo="text+y", legendgroup=rule,
                                         showlegend=col == 1 and r == 1), row=r, col=col)
        fig.update_xaxes(title_text="fraction of KV heads with the whole context", row=2, col=col)
    fig.update_yaxes(title_text="needle recall", row=1, col=1)
    fig.update_yaxes(title_text="perplexity", row=2, col=1)
    title = (plotly_text(compression_title(result)) if is_conversion(result) else
             f"{plotly_text(result.get('model_id') or 'model')}: streaming heads, recall and perplexity against the "
             "heads kept whole")
    fig.update_layout(title=title, width=max(560, 420 * len(lengths)), height=720)
    return fig


SYMBOLS = ("circle", "diamond", "square", "cross")


def atlas_figure(doc: dict, method: str = "autoencoder") -> go.Figure:
    """Every head of an atlas document as a point of the ``method`` embedding, coloured by cluster
    (buttons recolour by layer or by any score), one marker symbol per model, ``customdata`` the
    head's index; a comparison of two sets of the same shape draws each head's move as a grey line."""
    points = doc["points"][method]
    heads = doc["heads"]
    names = doc["names"]
    hover = [f"{plotly_text(doc['models'][s])}: layer {l}, head {h}<br>cluster: {plotly_text(names[c])}"
             for (s, l, h), c in zip(heads, doc["clusters"])]
    fig = go.Figure()
    if doc.get("displacement") is not None:
        n = len(heads) // 2
        xs, ys = [], []
        for i in range(n):
            xs += [points[i][0], points[n + i][0], None]
            ys += [points[i][1], points[n + i][1], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#bbb", "width": 1}, hoverinfo="skip",
                                 name="moved"))
    fig.add_trace(go.Scatter(
        x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", customdata=list(range(len(points))),
        hovertext=hover, hoverinfo="text", name="heads", showlegend=False,
        marker={"color": doc["clusters"], "colorscale": "Turbo", "size": 8, "line": {"width": 0.5, "color": "#333"},
                "symbol": [SYMBOLS[s % len(SYMBOLS)] for s, _, _ in heads]}))
    colourings = [("cluster", doc["clusters"]), ("layer", [l for _, l, _ in heads])]
    colourings += [(name, values) for name, values in doc["scores"].items()]
    index = len(fig.data) - 1
    buttons = [{"label": plotly_text(name), "method": "restyle",
                "args": [{"marker.color": [values], "marker.showscale": name != "cluster"}, [index]]}
               for name, values in colourings]
    fig.update_layout(title={"text": f"{plotly_text(method)} embedding of {len(heads)} heads", "y": 0.98},
                      updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "y": 1.1, "xanchor": "left",
                                    "yanchor": "bottom"}],
                      width=520, height=540, margin={"t": 100, "l": 40, "r": 20, "b": 40}, hovermode="closest")
    return fig


def layer_trend_figure(doc: dict) -> go.Figure:
    """Median attention distance (the locality bin's lower edge) per layer, one line per model."""
    fig = go.Figure()
    for label, values in doc["layer_trends"].items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=[max(v, 0.5) for v in values], mode="lines+markers",
                                 name=plotly_text(label)))
    fig.update_layout(title="median attention distance per layer (median over the layer's heads)",
                      xaxis_title="layer", yaxis_title="distance (tokens, log)", yaxis_type="log", width=620, height=380)
    return fig


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
