"""The masking validation's figure: the metric under top-K masking against random sets (plotly)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...core.escaping import plotly_text
from ..figures import PAGE_WIDTH


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
    fig.update_layout(title=f"{plotly_text(curve['score'])}: top-K heads against random-K",
                      width=min(PAGE_WIDTH, max(520, 420 * len(measures))), height=440,
                      legend={"orientation": "h", "y": -0.2, "x": 0}, margin={"b": 90})
    return fig


def masking_subtitle(curve: dict) -> str:
    """What the plot measured, in a sentence for the text beside it (plain text: escape it for its context)."""
    return (f"{curve['metric']} under {curve['mode']} masking of the top-K heads by {curve['score']} and of random "
            f"sets of K heads matched by layer, over {curve['n_used']} of {curve['n_items']} items; bars: 95% "
            "bootstrap intervals over the items; hover a point for both tests' p-values.")
