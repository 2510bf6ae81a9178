"""The interactive attention page: one standalone HTML file with an overview grid of heads, the
detail map of the head clicked there, and the attention of a clicked query over the text.

Maps travel as 16-bit codes (:func:`headlab.probes.views.data.encode_map`) and are drawn by the
page's script; every token reaches the page as JSON with ``<``, ``>`` and ``&`` escaped and is
shown through ``textContent`` or HTML-escaped plotly labels, so markup in a prompt stays text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...core.escaping import html_text, script_json
from ...core.files import GENERATOR_META, claim_file, write_text
from ...core.head_scores import HeadScores
from ..figures import colour_scale, colourise, plotly_js, plotly_js_version
from .data import ViewData, encode_map
from .figure import overview_figure


def page_payload(data: ViewData, scores: dict[str, HeadScores] | None = None) -> dict:
    """The JSON the page script reads: tokens, encoded maps, colour tables, overview figures."""
    names = list(data.scores) + [n for n in (scores or {}) if n not in data.scores]
    overviews = {name: json.loads(overview_figure(data, name, scores).to_json()) for name in names}
    heads = sorted(data.before)
    return {
        "model_id": data.model_id,
        "tokens": data.tokens,
        "block": data.block,
        "n_heads": data.n_heads,
        "plan": data.plan_name,
        "heads": [[layer, head] for layer, head in heads],
        "before": {f"{l},{h}": encode_map(data.before[(l, h)]) for l, h in heads},
        "after": {f"{l},{h}": encode_map(data.after[(l, h)]) for l, h in heads} if data.after is not None else None,
        "lut": {"Blues": _lut(False), "RdBu_r": _lut(True)},
        "scales": {"Blues": colour_scale(False), "RdBu_r": colour_scale(True)},
        "overviews": overviews,
        "grids": {name: [[None if v != v else v for v in row] for row in _grid(data, name, scores).tolist()]
                  for name in names},
        "default_score": "previous_token" if "previous_token" in overviews else names[0],
    }


def _grid(data: ViewData, name: str, scores: dict[str, HeadScores] | None) -> torch.Tensor:
    return scores[name].values if scores and name in scores else data.scores[name]


def _lut(diverging: bool) -> list[list[int]]:
    ramp = np.linspace(-1, 1, 256) if diverging else np.linspace(0, 1, 256)
    return colourise(torch.tensor(ramp)[None], diverging)[0].tolist()


def write_view(data: ViewData, path: str | Path, scores: dict[str, HeadScores] | None = None,
               head: tuple[int, int] | None = None, plotlyjs: str = "inline", overwrite: bool = False) -> Path:
    """Write the standalone page to ``path`` (atomically). ``head`` opens first (default: the top
    head of the previous-token score); ``plotlyjs`` is ``"inline"`` (opens offline, +4.7 MB) or
    ``"cdn"``. An existing file at ``path`` is replaced only when headlab wrote it, or with
    ``overwrite``."""
    claim_file(path, overwrite, "view page")
    if plotlyjs not in ("inline", "cdn"):
        raise ValueError(f"plotlyjs must be 'inline' or 'cdn', not {plotlyjs!r}")
    if head is not None and head not in data.before:
        raise ValueError(f"layer {head[0]}, head {head[1]} is not in this view")
    payload = page_payload(data, scores)
    payload["initial"] = list(head) if head is not None else None
    script = f"<script>{plotly_js()}</script>" if plotlyjs == "inline" else \
        f"<script src='https://cdn.plot.ly/plotly-{plotly_js_version()}.min.js'></script>"
    title = html_text(f"headlab attention view: {data.model_id}")
    page = PAGE.format(generator=GENERATOR_META, title=title, plotly=script, payload=script_json(payload), style=STYLE,
                       script=SCRIPT)
    write_text(path, page)
    return Path(path)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }
#tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.6;
          max-height: 24em; overflow-y: auto; border: 1px solid #ddd; padding: 0.5em; }
#tokens span { border-radius: 2px; }
#tokens span.query { outline: 2px solid #d62728; }
.note { color: #555; font-size: 0.9em; }
#hover-info { font-family: ui-monospace, monospace; min-height: 1.4em; }
"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8">{generator}<title>{title}</title>
<style>{style}</style>{plotly}</head>
<body>
<h1>{title}</h1>
<p id="summary" class="note"></p>
<label>score shown on the grid <select id="score"></select></label>
<p class="note">Click a head in the grid to open its map; click a query row of the map to colour the text
by that query's attention. Map colours saturate at the 99.5th percentile of the nonzero weights of each
panel (a sink's full weight would otherwise wash out the rest); hover gives exact values.</p>
<div id="overview"></div>
<h2 id="detail-title">head</h2>
<div id="detail"></div>
<div id="hover-info"></div>
<h3 id="tokens-title">text</h3>
<div id="tokens"></div>
<script type="application/json" id="view-data">{payload}</script>
<script>{script}</script>
</body></html>
"""

SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("view-data").textContent);
const N = DATA.tokens.length, BLOCK = DATA.block;
const cache = new Map();
let current = null;

// plotly reads a small HTML subset in labels: escape what could open a tag or an entity
function esc(s) { return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function shown(tok) {
  const visible = tok.replace(/\n/g, "\\n").replace(/\t/g, "\\t");
  return visible.length > 24 ? visible.slice(0, 23) + "\u2026" : visible;
}

async function decodeMap(enc) {
  const raw = Uint8Array.from(atob(enc.data), c => c.charCodeAt(0));
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
  const view = new DataView(await new Response(stream).arrayBuffer());
  const values = new Float32Array(enc.side * enc.side), scale = enc.vmax / 65535;
  for (let i = 0; i < values.length; i++) values[i] = view.getUint16(2 * i, true) * scale;
  return {side: enc.side, values: values};
}

async function headMaps(key) {
  if (!cache.has(key)) {
    const maps = [await decodeMap(DATA.before[key])];
    if (DATA.after) {
      const after = await decodeMap(DATA.after[key]);
      const diff = new Float32Array(after.values.length);
      for (let i = 0; i < diff.length; i++) diff[i] = after.values[i] - maps[0].values[i];
      maps.push(after, {side: after.side, values: diff});
    }
    cache.set(key, maps);
  }
  return cache.get(key);
}

function rows(map) {
  const out = [];
  for (let r = 0; r < map.side; r++) out.push(Array.from(map.values.subarray(r * map.side, (r + 1) * map.side)));
  return out;
}

function blockRange(b) { return [b * BLOCK, Math.min((b + 1) * BLOCK, N) - 1]; }

// Colours saturate at the 99.5th percentile of the nonzero |weights|, so a sink holding row 0's
// full weight does not wash out the rest of the map; hover shows the exact weights.
const SATURATION = 0.995;
function colourBound(map) {
  const nonzero = [];
  for (const v of map.values) if (v !== 0) nonzero.push(Math.abs(v));
  if (!nonzero.length) return 1;
  nonzero.sort((a, b) => a - b);
  return nonzero[Math.min(nonzero.length - 1, Math.floor(SATURATION * nonzero.length))];
}

function imageSource(map, diverging) {
  const lut = DATA.lut[diverging ? "RdBu_r" : "Blues"];
  const bound = colourBound(map);
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = map.side;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(map.side, map.side);
  for (let i = 0; i < map.values.length; i++) {
    const t = diverging ? (map.values[i] / bound + 1) / 2 : map.values[i] / bound;  // clamped below
    const c = lut[Math.max(0, Math.min(255, Math.round(t * 255)))];
    img.data.set([c[0], c[1], c[2], 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  return canvas.toDataURL("image/png");
}

function trace(map, diverging, axis) {
  if (BLOCK === 1) {
    const labels = DATA.tokens.map((t, i) => i + ": " + esc(shown(t)));
    const bound = colourBound(map);
    const shows = diverging || axis === "";
    return Object.assign({type: "heatmap", z: rows(map), x: labels, y: labels, xaxis: "x" + axis, yaxis: "y",
      hovertemplate: "query %{y}<br>key %{x}<br>weight %{z:.5f}<extra></extra>", showscale: shows,
      colorbar: {len: 0.45, y: diverging ? 0.22 : 0.78}},
      diverging ? {colorscale: DATA.scales.RdBu_r, zmin: -bound, zmax: bound}
                : {colorscale: DATA.scales.Blues, zmin: 0, zmax: bound});
  }
  return {type: "image", source: imageSource(map, diverging), xaxis: "x" + axis, yaxis: "y", hoverinfo: "x+y"};
}

async function showHead(layer, head) {
  const key = layer + "," + head;
  if (!(key in DATA.before)) return;
  current = {layer: layer, head: head, maps: await headMaps(key)};
  const titles = DATA.after ? ["before surgery", "after surgery", "after \u2212 before"] : ["attention"];
  const traces = current.maps.map((m, i) => trace(m, i === 2, i === 0 ? "" : String(i + 1)));
  const note = BLOCK === 1 ? "token" : "token (" + BLOCK + "-token blocks, mean weight)";
  const layout = {height: 760, margin: {t: 40, l: 150, r: 20, b: 150}, annotations: [],
    yaxis: {title: {text: "query " + note}, autorange: "reversed", type: BLOCK === 1 ? "category" : "linear"}};
  const width = 1 / titles.length;
  titles.forEach((t, i) => {
    const name = "xaxis" + (i === 0 ? "" : i + 1);
    layout[name] = {domain: [i * width + 0.02, (i + 1) * width - 0.02], title: {text: "key " + note},
                    tickangle: -60, type: BLOCK === 1 ? "category" : "linear", anchor: "y"};
    if (BLOCK > 1) {
      const side = current.maps[0].side, ticks = [];
      for (let b = 0; b < side; b += Math.max(1, Math.floor(side / 8))) ticks.push(b);
      layout[name].tickvals = ticks; layout[name].ticktext = ticks.map(b => String(b * BLOCK));
      if (i === 0) { layout.yaxis.tickvals = ticks; layout.yaxis.ticktext = layout[name].ticktext; }
    }
    layout.annotations.push({text: t, showarrow: false, xref: "paper", yref: "paper",
                             x: i * width + width / 2, y: 1.04});
  });
  const plan = DATA.plan ? " \u2014 plan " + DATA.plan : "";
  document.getElementById("detail-title").textContent = "layer " + layer + ", head " + head + plan;
  const div = document.getElementById("detail");
  await Plotly.react(div, traces, layout);
  if (!div.dataset.bound) {
    div.on("plotly_click", ev => selectQuery(ev.points[0]));
    div.on("plotly_hover", ev => describe(ev.points[0]));
    div.dataset.bound = "1";
  }
  selectQuery(null);
}

function cellIndex(point) {
  if (BLOCK === 1) return [point.pointIndex[0], point.pointIndex[1]];
  return [Math.floor(point.y + 0.5), Math.floor(point.x + 0.5)];
}

function describe(point) {
  if (!current) return;
  const [q, k] = cellIndex(point), map = current.maps[0];
  if (q < 0 || k < 0 || q >= map.side || k >= map.side) return;
  const weight = map.values[q * map.side + k];
  let text;
  if (BLOCK === 1) {
    text = "query " + q + " " + JSON.stringify(DATA.tokens[q]) + " \u2192 key " + k + " " +
           JSON.stringify(DATA.tokens[k]) + ": weight " + weight.toFixed(5);
  } else {
    const [q0, q1] = blockRange(q), [k0, k1] = blockRange(k);
    text = "queries " + q0 + "\u2013" + q1 + " \u2192 keys " + k0 + "\u2013" + k1 + ": mean weight " + weight.toFixed(6);
  }
  document.getElementById("hover-info").textContent = text;
}

function selectQuery(point) {
  const panel = document.getElementById("tokens"), title = document.getElementById("tokens-title");
  panel.replaceChildren();
  let weights = null, row = -1, panelIndex = 0;
  if (point && current) {
    row = cellIndex(point)[0];
    panelIndex = Math.min(point.curveNumber, 1);
    const map = current.maps[panelIndex];
    weights = map.values.subarray(row * map.side, (row + 1) * map.side);
  }
  let top = 0;
  if (weights) for (const w of weights) top = Math.max(top, w);
  DATA.tokens.forEach((tok, i) => {
    const span = document.createElement("span");
    span.textContent = tok;
    span.title = "token " + i;
    if (weights) {
      const w = weights[BLOCK === 1 ? i : Math.floor(i / BLOCK)];
      span.style.backgroundColor = "rgba(31, 119, 180, " + (top > 0 ? w / top : 0).toFixed(3) + ")";
      span.title += ", weight " + w.toFixed(5);
      if ((BLOCK === 1 ? i : Math.floor(i / BLOCK)) === row) span.className = "query";
    }
    panel.appendChild(span);
  });
  if (!weights) { title.textContent = "text (click a query row of the map)"; return; }
  const which = DATA.after ? (panelIndex === 0 ? " before surgery" : " after surgery") : "";
  title.textContent = BLOCK === 1
    ? "attention of query " + row + " " + JSON.stringify(DATA.tokens[row]) + which + " over the text"
    : "attention of queries " + blockRange(row).join("\u2013") + which + " over the text (per key block)";
}

function showOverview(name) {
  const fig = DATA.overviews[name];
  const div = document.getElementById("overview");
  Plotly.react(div, fig.data, fig.layout);
}

function init() {
  const select = document.getElementById("score");
  for (const name of Object.keys(DATA.overviews)) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  select.value = DATA.default_score;
  select.addEventListener("change", () => showOverview(select.value));
  showOverview(select.value);
  document.getElementById("overview").on("plotly_click", ev => showHead(ev.points[0].y, ev.points[0].x));
  const unit = BLOCK === 1 ? "one cell per token" : BLOCK + "-token blocks (mean weight per block)";
  document.getElementById("summary").textContent = DATA.model_id + ": " + N + " tokens, " +
    DATA.heads.length + " heads, maps in " + unit + (DATA.plan ? ", compared under plan " + DATA.plan : "");
  const linked = /^#head=(\d+)\.(\d+)$/.exec(window.location.hash);  // e.g. views.html#head=17.3
  let first = linked ? [Number(linked[1]), Number(linked[2])] : DATA.initial;
  if (first && !((first[0] + "," + first[1]) in DATA.before)) first = null;
  if (!first) {
    const grid = DATA.grids[DATA.default_score];
    let best = -Infinity;
    for (const [l, h] of DATA.heads) if (grid[l][h] !== null && grid[l][h] > best) { best = grid[l][h]; first = [l, h]; }
    first = first || DATA.heads[0];
  }
  showHead(first[0], first[1]).then(() => { document.body.dataset.ready = "1"; });
}
init();
"""

__all__ = ["page_payload", "write_view"]
