"""The head atlas's figures: the heads embedded in 2D by cluster, and the layer trend of locality (plotly)."""

from __future__ import annotations

import plotly.graph_objects as go

from ...core.escaping import plotly_text

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
