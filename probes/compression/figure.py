"""The KV-cache compression figure: recall and perplexity against the cache kept, per rule (plotly)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...core.escaping import plotly_text
from ..figures import PAGE_WIDTH

RULE_COLOURS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def held(row: dict) -> float:
    """A summary row's place on the bytes axis: its cache's fraction of the unedited model's (its kept
    fraction where the unedited model was not measured)."""
    return row["kv_fraction"] if row["kv_fraction"] is not None else row["keep"]


def compression_figure(result: dict) -> go.Figure:
    """KV-cache compression: needle recall (top row, 95% bootstrap intervals) and perplexity (bottom
    row) against the cache's bytes after the prompt as a fraction of the unedited model's (one axis
    for streaming heads and presses alike), one column per length, one line per rule or press
    (random: the mean of its draws, in grey), the unedited model as a dashed line. A converted checkpoint's evaluation: its points against its
    base model's dashed line. Untitled: the page's heading names it."""
    from ..compression.file import FULL, is_conversion

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
                                key=held)
                colour = "#7f7f7f" if rule == "random" else RULE_COLOURS[i % len(RULE_COLOURS)]
                hover = [f"{plotly_text(rule)}, keep {p['keep']:.0%} ({p['full_heads']} KV heads whole)<br>"
                         f"KV cache {p['kv_fraction']:.0%} of the {reference}" if p["kv_fraction"] is not None else
                         plotly_text(rule) for p in points]
                error = None
                if measure == "recall":
                    error = {"type": "data", "symmetric": False,
                             "array": [p["recall_ci"][1] - p["recall"] for p in points],
                             "arrayminus": [p["recall"] - p["recall_ci"][0] for p in points]}
                fig.add_trace(go.Scatter(x=[held(p) for p in points], y=[p[measure] for p in points],
                                         mode="lines+markers", name=plotly_text(rule), line={"color": colour},
                                         error_y=error, hovertext=hover, hoverinfo="text+y", legendgroup=rule,
                                         showlegend=col == 1 and r == 1), row=r, col=col)
        fig.update_xaxes(title_text=f"KV cache held (fraction of the {reference}'s bytes)", row=2, col=col)
    fig.update_yaxes(title_text="needle recall", row=1, col=1)
    fig.update_yaxes(title_text="perplexity", row=2, col=1)
    fig.update_layout(width=min(PAGE_WIDTH, max(560, 340 * len(lengths) + 220)), height=720,
                      margin={"t": 50}, legend={"orientation": "h", "y": -0.12, "x": 0})
    return fig
