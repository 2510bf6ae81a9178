"""The attention view's figures: the overview grid of heads coloured by a score, and one head's map (a token
heatmap, or a pooled image for long inputs), before and after a plan (plotly)."""

from __future__ import annotations

import base64
import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ...core.escaping import plotly_text
from ...core.head_scores import HeadScores
from ..figures import colour_scale, colourise, display_token, score_heatmap
from ..scorers.record import AttentionRecord
from .data import ViewData, png_rgb, view_data_from_record


def view(data: ViewData | AttentionRecord, layer: int | None = None, head: int | None = None,
         compare: AttentionRecord | None = None, score: str = "previous_token",
         scores: dict[str, HeadScores] | None = None) -> go.Figure:
    """A plotly figure of recorded attention: the layers × heads overview coloured by ``score``
    (a pattern score of the record, or a name in ``scores``, e.g. a report's scores.json), or,
    with ``layer`` and ``head``, that head's map (side by side with ``compare``, the same input
    after surgery, and their difference). Shows in Jupyter; ``write_html``/:func:`~..figures.export_figure`
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


