"""The attention view's figures: the overview grid of heads coloured by a score, and one head's map (a token
heatmap, or an image: always for pooled long inputs), before and after a plan, each panel with a titled colour
bar and colours that saturate where the views page's do (plotly)."""

from __future__ import annotations

import base64
import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ...core.escaping import plotly_text
from ...core.head_scores import HeadScores
from ..figures import (PAGE_WIDTH, colour_indices, colour_lut, colour_scale, display_token, png_image,
                       saturation_bound, score_heatmap)
from ..scorers.patterns import PATTERN_SCORES
from ..scorers.record import AttentionRecord
from .data import ViewData, view_data_from_record


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
        values, description = scores[score].values, scores[score].description
    elif score in data.scores:
        values, description = data.scores[score], PATTERN_SCORES.get(score, "")
    else:
        known = sorted(set(data.scores) | set(scores or {}))
        raise ValueError(f"unknown score {score!r}; available: {', '.join(known)}")
    shown = values.clone()
    viewed = torch.zeros_like(shown, dtype=torch.bool)
    for layer, head in data.before:
        viewed[layer, head] = True
    shown[~viewed] = math.nan
    result = HeadScores(score, shown, viewed.long(), data.model_id, description)
    fig = score_heatmap(result, data.n_kv_heads)
    fig.update_layout(title=f"{plotly_text(score)}: {plotly_text(data.model_id)} ({len(data.tokens)} tokens)")
    return fig


def head_figure(data: ViewData, layer: int, head: int, image: bool | None = None) -> go.Figure:
    """The map of one head: a token heatmap, or with ``image`` (the default for pooled maps) a palette
    image, which stays small at any length; with a plan, before | after | after − before. Colours
    saturate at each panel's :func:`~headlab.probes.figures.saturation_bound`."""
    image = data.block > 1 if image is None else image
    panels = [("before surgery" if data.after is not None else "attention", data.pooled(layer, head))]
    if data.after is not None:
        after = data.pooled(layer, head, compare=True)
        panels += [("after surgery", after), ("after − before", after - panels[0][1])]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels],
                        horizontal_spacing=0.12, shared_yaxes=True)
    weight = "attention weight" if data.block == 1 else "mean attention weight per block"
    for col, (title, values) in enumerate(panels, start=1):
        diverging = title == "after − before"
        bar = {"title": {"text": title if diverging else weight, "side": "right"}, "thickness": 12, "len": 0.9,
               "x": fig.layout[f"xaxis{col if col > 1 else ''}"].domain[1] + 0.01, "xanchor": "left"}
        bound = saturation_bound(values)
        if image:
            fig.add_trace(_image(data, values, diverging, bound), row=1, col=col)
            fig.add_trace(_colour_bar(diverging, bound, bar), row=1, col=col)
        else:
            fig.add_trace(_token_heatmap(data, values, diverging, bound, bar), row=1, col=col)
    _label_axes(fig, data, len(panels), image)
    plan = f", plan {plotly_text(data.plan_name)}" if data.plan_name else ""
    fig.update_layout(title=f"layer {layer}, head {head}{plan}: {plotly_text(data.model_id)}",
                      width=min(PAGE_WIDTH, 140 + 640 * len(panels)), height=780,
                      margin={"t": 80, "l": 150 if not image else 70, "r": 20, "b": 150 if not image else 70})
    return fig


def _token_heatmap(data: ViewData, values: torch.Tensor, diverging: bool, bound: float, bar: dict) -> go.Heatmap:
    labels = [f"{i}: {display_token(t)}" for i, t in enumerate(data.tokens)]
    colour = {"colorscale": colour_scale(diverging), "zmin": -bound if diverging else 0, "zmax": bound}
    return go.Heatmap(z=values.double().mul(1e5).round().div(1e5).tolist(), x=labels, y=labels, colorbar=bar,
                      hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.5f}<extra></extra>", **colour)


def _image(data: ViewData, values: torch.Tensor, diverging: bool, bound: float) -> go.Image:
    png = png_image(colour_indices(values, diverging, bound), colour_lut("RdBu_r" if diverging else "Blues"))
    cell = "token" if data.block == 1 else "block"
    return go.Image(source="data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                    hovertemplate=f"query {cell} %{{y}}<br>key {cell} %{{x}}<extra></extra>")


def _colour_bar(diverging: bool, bound: float, bar: dict) -> go.Scatter:
    """An invisible trace that carries an image panel's colour bar (images have none)."""
    return go.Scatter(x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False,
                      marker={"colorscale": colour_scale(diverging), "cmin": -bound if diverging else 0, "cmax": bound,
                              "color": [0], "showscale": True, "colorbar": bar})


def _label_axes(fig: go.Figure, data: ViewData, n_panels: int, image: bool) -> None:
    side = data.pooled(*next(iter(data.before))).shape[-1]
    if not image:
        note = "token"
        options = {"type": "category", "tickangle": -60}
    else:
        note = "position" if data.block == 1 else f"token block ({data.block} tokens per block, mean weight)"
        ticks = list(range(0, side, max(1, side // 8)))
        options = {"tickvals": ticks, "ticktext": [f"{t * data.block}" for t in ticks]}
    for col in range(1, n_panels + 1):
        fig.update_xaxes(title_text=f"key {note}", row=1, col=col, **options)
    fig.update_yaxes(title_text=f"query {note}", autorange="reversed", row=1, col=1, **options)
