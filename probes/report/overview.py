"""The top of the report: every score as a small heatmap that links to its section, and the heads' roles,
read from the scores by one stated rule (the scores in whose top :data:`ROLE_TOP` heads a head ranks)."""

from __future__ import annotations

import base64

import numpy as np

from ...core.escaping import element_id, html_attribute, html_text
from ...core.head_scores import HeadScores
from ..figures import colour_lut, png_image

ROLE_TOP = 5  # a head's roles: the scores in whose ROLE_TOP highest heads it ranks
SHOWN_TOP = 3  # heads named per score in the table of roles
NO_VALUE = (200, 200, 200)  # a tile's colour where a head has no value


def tile_png(values) -> bytes:
    """A ``[layer, head]`` score as a palette PNG of one pixel per head, layer 0 in the bottom row (as on
    the heatmaps), coloured on Viridis from the score's lowest value to its highest; grey where NaN."""
    grid = np.asarray(values, dtype=np.float64)[::-1]
    known = grid[~np.isnan(grid)]
    low, high = (float(known.min()), float(known.max())) if known.size else (0.0, 1.0)
    position = (grid - low) / ((high - low) or 1.0)
    indices = np.where(np.isnan(grid), 255, np.round(np.nan_to_num(position) * 254)).astype(np.uint8)
    palette = np.vstack([colour_lut("Viridis")[np.linspace(0, 255, 255).round().astype(int)], [NO_VALUE]])
    return png_image(indices, palette)


def overview_html(scores: dict[str, HeadScores]) -> str:
    """The grid of every score's tile, each a link to the score's section."""
    tiles = [_tile(name, score) for name, score in scores.items()]
    n_layers, n_heads = next(iter(scores.values())).values.shape
    return ("<section id='overview'><h2>Overview</h2><p class='note'>Each tile is one score over every head: "
            f"{n_heads} heads across, {n_layers} layers up (layer 0 at the bottom), coloured on its own scale from "
            "its lowest value (dark purple) to its highest (yellow); grey where a head has no value. Click a tile "
            "for the score's section.</p><div class='overview'>" + "".join(tiles) + "</div></section>")


def _tile(name: str, score: HeadScores) -> str:
    n_layers, n_heads = score.values.shape
    width = max(3, min(14, 100 // n_heads)) * n_heads
    height = max(2, min(14, 120 // n_layers)) * n_layers
    source = "data:image/png;base64," + base64.b64encode(tile_png(score.values)).decode("ascii")
    best = score.top(1)
    top = f"top L{best[0][0]}.H{best[0][1]} ({best[0][2]:.3g})" if best else "no values"
    return (f"<a class='tile' href='#{element_id('score', name)}' title='{html_attribute(name)}'>"
            f"<img src='{source}' width='{width}' height='{height}' alt='{html_attribute(name)}'>"
            f"<span class='tile-name'>{html_text(name)}</span><span class='tile-top'>{html_text(top)}</span></a>")


def head_roles(scores: dict[str, HeadScores], top: int = ROLE_TOP) -> dict[tuple[int, int], list[str]]:
    """``{(layer, head): scores}``: the scores in whose ``top`` highest heads (NaN excluded) each head ranks;
    a score equal on every head gives no roles."""
    roles: dict[tuple[int, int], list[str]] = {}
    for name, score in scores.items():
        if not _spread(score):
            continue
        for layer, head, _ in score.top(top):
            roles.setdefault((layer, head), []).append(name)
    return roles


def _spread(score: HeadScores) -> bool:
    """Whether the score tells heads apart: its known values are not all equal."""
    known = score.values[~score.values.isnan()]
    return bool(known.numel()) and bool(known.max() > known.min())


def roles_html(scores: dict[str, HeadScores], group: int) -> str:
    """The roles section: each score's top heads, then the heads in the top :data:`ROLE_TOP` of two or
    more scores (``group``: query heads per KV head)."""
    rows = []
    for name, score in scores.items():
        heads = (", ".join(f"{_head_link(l, h)} ({v:.3g})" for l, h, v in score.top(SHOWN_TOP)) if _spread(score)
                 else "equal on every head: no roles")
        rows.append(f"<tr><td><a href='#{element_id('score', name)}'>{html_text(name)}</a></td><td>{heads}</td></tr>")
    shared = sorted(((head, names) for head, names in head_roles(scores).items() if len(names) > 1),
                    key=lambda item: (-len(item[1]), item[0]))
    several = "".join(f"<tr><td>{_head_link(l, h)}</td><td>{h // group}</td><td>{len(names)}</td>"
                      f"<td>{html_text(', '.join(names))}</td></tr>" for (l, h), names in shared)
    return ("<section id='roles'><h2>Head roles</h2>"
            f"<p class='note'>The rule: a head's roles are the scores in whose {ROLE_TOP} highest heads it ranks "
            "(highest values first, as in each section's table; for entropy, the broadest heads). Related scores "
            "(induction and duplicate_token, sink_first_token and confidence, …) count separately, so one behaviour "
            "measured twice gives a head two roles; a score equal on every head gives none.</p>"
            f"<h3>Top {SHOWN_TOP} heads of each score</h3><div class='table-box'><table><tr><th>score</th>"
            f"<th>heads (value)</th></tr>{''.join(rows)}</table></div>"
            f"<h3>Heads in the top {ROLE_TOP} of two or more scores</h3>"
            + (f"<div class='table-box'><table><tr><th>head</th><th>KV group</th><th>roles</th><th>scores</th></tr>"
               f"{several}</table></div>" if several else "<p>None: no head is among the top of two scores.</p>")
            + "</section>")


def _head_link(layer: int, head: int) -> str:
    return f"<a href='views.html#head={layer}.{head}'>L{layer}.H{head}</a>"


__all__ = ["ROLE_TOP", "head_roles", "overview_html", "roles_html", "tile_png"]
