"""The head atlas's figures: the heads embedded in 2D, one legend entry per cluster, and the layer trend of
locality (plotly)."""

from __future__ import annotations

import plotly.colors
import plotly.graph_objects as go

from ...core.escaping import plotly_text

SYMBOLS = ("circle", "diamond", "square", "cross")
AXES = {"autoencoder": "autoencoder code", "pca": "principal component", "tsne": "t-SNE coordinate"}


def atlas_figure(doc: dict, method: str = "autoencoder") -> go.Figure:
    """Every head of an atlas document as a point of the ``method`` embedding, one trace (and legend
    entry) per cluster in its own colour; the menu recolours every trace by layer or by a score on one
    colour bar, one marker symbol per model, ``customdata`` the head's index; a comparison of two sets of
    the same shape draws each head's move as a grey line. The axes are the embedding's two coordinates."""
    points, heads = doc["points"][method], doc["heads"]
    fig = go.Figure()
    if doc.get("displacement") is not None:
        n = len(heads) // 2
        xs, ys = [], []
        for i in range(n):
            xs += [points[i][0], points[n + i][0], None]
            ys += [points[i][1], points[n + i][1], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#bbb", "width": 1}, hoverinfo="skip",
                                 name="moved"))
    members = [[i for i, c in enumerate(doc["clusters"]) if c == cluster] for cluster in range(len(doc["names"]))]
    colours = plotly.colors.qualitative.D3
    first = len(fig.data)
    for cluster, indices in enumerate(members):
        fig.add_trace(go.Scatter(
            x=[points[i][0] for i in indices], y=[points[i][1] for i in indices], mode="markers", customdata=indices,
            name=plotly_text(doc["names"][cluster]), hoverinfo="text",
            hovertext=[f"{plotly_text(doc['models'][heads[i][0]])}: layer {heads[i][1]}, head {heads[i][2]}<br>"
                       f"cluster: {plotly_text(doc['names'][cluster])}" for i in indices],
            marker={"color": colours[cluster % len(colours)], "size": 8, "line": {"width": 0.5, "color": "#333"},
                    "symbol": [SYMBOLS[heads[i][0] % len(SYMBOLS)] for i in indices]}))
    traces = list(range(first, len(fig.data)))
    buttons = [{"label": "cluster", "method": "restyle",
                "args": [{"marker.color": [colours[c % len(colours)] for c in range(len(members))],
                          "marker.showscale": False}, traces]}]
    colourings = [("layer", [l for _, l, _ in heads])] + list(doc["scores"].items())
    buttons += [_colour_button(name, values, members, traces) for name, values in colourings]
    axis = AXES.get(method, method)
    fig.update_layout(title={"text": f"{plotly_text(method)} embedding of {len(heads)} heads", "y": 0.98},
                      updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "y": 1.1, "xanchor": "left",
                                    "yanchor": "bottom"}],
                      xaxis_title=f"{axis} 1", yaxis_title=f"{axis} 2",
                      legend={"title": {"text": "cluster"}, "orientation": "h", "y": -0.18, "x": 0},
                      width=520, height=600, margin={"t": 100, "l": 60, "r": 20, "b": 60}, hovermode="closest")
    return fig


def _colour_button(name: str, values: list, members: list[list[int]], traces: list[int]) -> dict:
    """A menu entry colouring every cluster's points by ``values`` (one per head) on one shared scale,
    with one colour bar titled ``name``."""
    known = [v for v in values if v is not None]
    low, high = (min(known), max(known)) if known else (0, 1)
    n = len(members)
    return {"label": plotly_text(name), "method": "restyle",
            "args": [{"marker.color": [[values[i] for i in indices] for indices in members],
                      "marker.colorscale": ["Viridis"] * n, "marker.cmin": [low] * n, "marker.cmax": [high] * n,
                      "marker.showscale": [i == 0 for i in range(n)],
                      "marker.colorbar.title.text": [plotly_text(name)] * n}, traces]}


def layer_trend_figure(doc: dict) -> go.Figure:
    """Median attention distance (the locality bin's lower edge) per layer, one line per model."""
    fig = go.Figure()
    for label, values in doc["layer_trends"].items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=[max(v, 0.5) for v in values], mode="lines+markers",
                                 name=plotly_text(label)))
    fig.update_layout(title="median attention distance per layer", xaxis_title="layer",
                      yaxis_title="median distance over the layer's heads (tokens, log)", yaxis_type="log",
                      width=620, height=400, legend={"orientation": "h", "y": -0.25, "x": 0})
    return fig
