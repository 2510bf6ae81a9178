"""Plotly figures of head scores and attention maps (the only module that imports plotly).

Every token string is HTML-escaped before it enters a figure, so a prompt containing markup
renders as text.
"""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go
import plotly.io as pio
import torch

from .scores import HeadScores

MAX_CELLS = 512


def display_token(token: str) -> str:
    """A token as safe, visible text: escaped, with newlines and tabs shown as escapes."""
    return html.escape(token.replace("\n", "\\n").replace("\t", "\\t"), quote=True)


def score_heatmap(scores: HeadScores, n_kv_heads: int, top_k: int = 5) -> go.Figure:
    """A ``[layer, head]`` heatmap with the value in each cell; the top-k heads are outlined."""
    values = scores.values
    n_layers, n_heads = values.shape
    group = max(n_heads // n_kv_heads, 1)
    ranks = {(l, h): r + 1 for r, (l, h, _) in enumerate(scores.top(n_layers * n_heads))}
    hover = [
        [
            f"layer {l}, head {h} (KV group {h // group})<br>{html.escape(scores.name)} = "
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
        title=html.escape(scores.name),
        xaxis_title="head",
        yaxis_title="layer",
        height=max(300, 22 * n_layers + 120),
        width=max(420, 48 * n_heads + 200),
        margin={"t": 50, "l": 60, "r": 20, "b": 50},
    )
    return fig


def attention_heatmap(head_map: torch.Tensor, tokens: list[str], title: str, max_cells: int = MAX_CELLS) -> go.Figure:
    """The ``[query, key]`` map of one head with tokens on both axes and token hover.

    Inputs longer than ``max_cells`` tokens are mean-pooled into square blocks; the axes then say
    which token range each block covers.
    """
    n = head_map.shape[-1]
    block = max(1, math.ceil(n / max_cells))
    if block == 1:
        z = head_map
        labels = [f"{i}: {display_token(t)}" for i, t in enumerate(tokens)]
        axis_note = "token"
    else:
        z = _block_mean(head_map, block)
        labels = [f"tokens {i * block}-{min((i + 1) * block, n) - 1}" for i in range(z.shape[-1])]
        axis_note = f"token block ({block} tokens per block, mean-pooled)"
    fig = go.Figure(
        go.Heatmap(
            z=z.double().mul(1e5).round().div(1e5).tolist(),  # 5 decimals keep the page small
            x=labels,
            y=labels,
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.4f}<extra></extra>",
            colorscale="Blues",
            zmin=0,
        )
    )
    fig.update_layout(
        title=html.escape(title),
        xaxis={"title": f"key {axis_note}", "tickangle": -60, "type": "category"},
        yaxis={"title": f"query {axis_note}", "autorange": "reversed", "type": "category"},
        width=820,
        height=820,
        margin={"t": 50, "l": 160, "r": 20, "b": 160},
    )
    return fig


def _block_mean(head_map: torch.Tensor, block: int) -> torch.Tensor:
    n = head_map.shape[-1]
    pad = (-n) % block
    padded = torch.nn.functional.pad(head_map, (0, pad, 0, pad), value=float("nan"))
    m = padded.shape[-1] // block
    blocks = padded.reshape(m, block, m, block)
    return blocks.nanmean(dim=(1, 3))


def figure_div(fig: go.Figure, div_id: str) -> str:
    """The figure as an HTML ``<div>`` fragment without plotly.js (the page includes it once)."""
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id)


def plotly_js() -> str:
    """The plotly.js bundle, to inline once per page so it opens offline."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()
