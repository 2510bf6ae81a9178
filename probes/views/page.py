"""The interactive attention view: one block of HTML with an overview grid of heads, the map of the head
clicked there (with the first token hidden and rows renormalised, or on a log colour scale, at a click),
and the attention of a clicked query over the text; written as a page beside a shared plotly.js
(:func:`write_view`) or shown in a notebook (:func:`show_view`).

Maps travel as one-byte square-root codes of every head, compressed together
(:func:`headlab.probes.views.data.encode_maps`), and are drawn by the script; every token reaches the page
as JSON with ``<``, ``>`` and ``&`` escaped and is shown through ``textContent`` or HTML-escaped plotly
labels, so markup in a prompt stays text.
"""

from __future__ import annotations

from pathlib import Path

from ...core.escaping import element_id, html_text, script_json
from ...core.files import GENERATOR_META, claim_file, write_text
from ...core.head_scores import HeadScores
from ..figures import NotebookHTML, notebook_html, output_id, plotly_script, scale_stops, value_label
from ..scorers.patterns import PATTERN_SCORES
from .data import ViewData, encode_maps, map_levels


def page_payload(data: ViewData, scores: dict[str, HeadScores] | None = None) -> dict:
    """The JSON the view's script reads: tokens, the encoded maps, colour scales and the grid of each
    score (four significant digits; ``None`` where a head has no value)."""
    names = list(data.scores) + [n for n in (scores or {}) if n not in data.scores]
    heads = sorted(data.before)
    levels = map_levels(len(data.tokens))
    return {
        "model_id": data.model_id,
        "tokens": data.tokens,
        "block": data.block,
        "plan": data.plan_name,
        "heads": [[layer, head] for layer, head in heads],
        "before": encode_maps([data.before[key] for key in heads], levels),
        "after": encode_maps([data.after[key] for key in heads], levels) if data.after is not None else None,
        "scales": {name: scale_stops(name) for name in ("Blues", "RdBu_r", "Viridis")},
        "grids": {name: [[None if v != v else float(f"{v:.4g}") for v in row] for row in _grid(data, name, scores)]
                  for name in names},
        "labels": {name: value_label(name, _description(name, scores)) for name in names},
        "default_score": "previous_token" if "previous_token" in names else names[0],
    }


def _grid(data: ViewData, name: str, scores: dict[str, HeadScores] | None) -> list[list[float]]:
    return (scores[name].values if scores and name in scores else data.scores[name]).tolist()


def _description(name: str, scores: dict[str, HeadScores] | None) -> str:
    return scores[name].description if scores and name in scores else PATTERN_SCORES.get(name, "")


def view_html(data: ViewData, scores: dict[str, HeadScores] | None = None, head: tuple[int, int] | None = None,
              root_id: str = "view", standalone: bool = True) -> str:
    """The view as one block of HTML (its style, markup, data and script) with the element id
    ``root_id``; it needs plotly.js loaded before it. ``head`` opens first (default: the top head of
    the grid's score); a ``standalone`` page also opens the head its address names (``#head=L.H``)."""
    if head is not None and head not in data.before:
        raise ValueError(f"layer {head[0]}, head {head[1]} is not in this view")
    payload = {**page_payload(data, scores), "initial": list(head) if head is not None else None,
               "standalone": standalone}
    return MARKUP.format(root=element_id(root_id), style=STYLE, payload=script_json(payload), script=SCRIPT)


def write_view(data: ViewData, path: str | Path, scores: dict[str, HeadScores] | None = None,
               head: tuple[int, int] | None = None, plotlyjs: str = "file", overwrite: bool = False) -> Path:
    """Write the view as a page at ``path`` (atomically). ``head`` opens first (default: the top head
    of the grid's score, previous-token when the view has it); ``plotlyjs`` (``"file"``, ``"inline"``
    or ``"cdn"``) as in :func:`~headlab.probes.figures.plotly_script`: by default the page links the
    plotly.js file it shares with the pages beside it. An existing page at ``path`` is replaced only
    when headlab wrote it, or with ``overwrite``."""
    path = Path(path)
    claim_file(path, overwrite, "view page")
    body = view_html(data, scores, head)
    title = html_text(f"headlab attention view: {data.model_id}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR_META}<title>{title}</title>"
            f"<style>{PAGE_STYLE}</style>{plotly_script(path.parent, plotlyjs)}</head>"
            f"<body><h1>{title}</h1>{body}</body></html>")
    return write_text(path, page)


def show_view(data: ViewData, scores: dict[str, HeadScores] | None = None,
              head: tuple[int, int] | None = None) -> NotebookHTML:
    """The view as a notebook output (``show_view(gather_view(...))`` at the end of a cell shows it):
    the page's grid, map, toggles and text, self-contained."""
    return notebook_html(view_html(data, scores, head, output_id("view"), standalone=False))


PAGE_STYLE = "body { font-family: system-ui, sans-serif; margin: 1em 2em; color: #222; }"

STYLE = """
.headlab-view { font-family: system-ui, sans-serif; color: #222; }
.headlab-view .hl-tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; overflow-wrap: anywhere;
  line-height: 1.6;
  max-height: 24em; overflow-y: auto; border: 1px solid #ddd; padding: 0.5em; }
.headlab-view .hl-tokens span { border-radius: 2px; }
.headlab-view .hl-tokens span.query { outline: 2px solid #d62728; }
.headlab-view .hl-note { color: #555; font-size: 0.9em; }
.headlab-view .hl-controls { display: flex; flex-wrap: wrap; gap: 0.5em 1.5em; align-items: center; }
.headlab-view .hl-hover { font-family: ui-monospace, monospace; min-height: 1.4em; }
.headlab-view .hl-box { max-width: 100%; overflow-x: auto; }
"""

MARKUP = """<div class="headlab-view" id="{root}"><style>{style}</style>
<p class="hl-summary hl-note"></p>
<div class="hl-controls">
<label>score shown on the grid <select class="hl-score"></select></label>
<label><input type="checkbox" class="hl-hide-first"> hide the first token, renormalise rows</label>
<label><input type="checkbox" class="hl-log"> log colour scale</label>
</div>
<p class="hl-note">Click a head in the grid to open its map; click a query row of the map to colour the text by
that query's attention. Map colours saturate at the 99.5th percentile of each panel's nonzero weights (a sink's full
weight would otherwise wash out the rest). Hiding the first token sets its column (for pooled maps, the first key
block) to zero and scales each row back to its former total; the log scale spans each panel from its smallest
stored weight to the saturation (differences stay linear).</p>
<div class="hl-box hl-overview"></div>
<h2 class="hl-detail-title">head</h2>
<div class="hl-box hl-detail"></div>
<div class="hl-hover"></div>
<h3 class="hl-tokens-title">text</h3>
<div class="hl-tokens"></div>
<script type="application/json" class="hl-data">{payload}</script>
<script>{script}
headlabView(document.getElementById("{root}"));</script>
</div>"""

SCRIPT = r"""
window.headlabView = function (root) {
"use strict";
const $ = selector => root.querySelector(selector);
const DATA = JSON.parse($(".hl-data").textContent);
const N = DATA.tokens.length, BLOCK = DATA.block;
const INDEX = new Map(DATA.heads.map((lh, i) => [lh[0] + "," + lh[1], i]));
const SATURATION = 0.995;
const stored = {}, cache = new Map();
let current = null, query = null;

// plotly reads a small HTML subset in labels: escape what could open a tag or an entity
function esc(s) { return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function shown(tok) {
  const visible = tok.replace(/\n/g, "\\n").replace(/\t/g, "\\t");
  return visible.length > 24 ? visible.slice(0, 23) + "\u2026" : visible;
}

// 256 colours of a scale, interpolated in RGB between its stops (as plotly.js does)
function lut(scale) {
  const stops = scale.map(s => [s[0], s[1].match(/[\d.]+/g).slice(0, 3).map(Number)]);
  const out = [];
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    let j = 0;
    while (j < stops.length - 2 && t > stops[j + 1][0]) j++;
    const [t0, a] = stops[j], [t1, b] = stops[j + 1], f = t1 > t0 ? (t - t0) / (t1 - t0) : 0;
    out.push([0, 1, 2].map(c => Math.round(a[c] + f * (b[c] - a[c]))));
  }
  return out;
}
const LUT = {Blues: lut(DATA.scales.Blues), RdBu_r: lut(DATA.scales.RdBu_r)};

async function inflate(base64) {
  const raw = Uint8Array.from(atob(base64), c => c.charCodeAt(0));
  const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// one head's map from the codes of every head: w_max * (code / levels)^2, lower triangle column by column
function decodeMap(encoded, codes, i) {
  const side = encoded.side, levels = encoded.levels, vmax = encoded.vmax[i];
  const lower = encoded.layout === "lower", count = lower ? side * (side + 1) / 2 : side * side;
  const values = new Float32Array(side * side);
  let p = i * count;
  const value = c => vmax * (c / levels) * (c / levels);
  if (lower) {
    for (let k = 0; k < side; k++) for (let q = k; q < side; q++) values[q * side + k] = value(codes[p++]);
  } else {
    for (let j = 0; j < side * side; j++) values[j] = value(codes[p++]);
  }
  return {side: side, values: values, vmax: vmax, levels: levels};
}

async function headMaps(key) {
  if (!cache.has(key)) {
    const maps = [];
    for (const which of DATA.after ? ["before", "after"] : ["before"]) {
      if (!stored[which]) stored[which] = await inflate(DATA[which].data);
      maps.push(decodeMap(DATA[which], stored[which], INDEX.get(key)));
    }
    cache.set(key, maps);
  }
  return cache.get(key);
}

// the first key (block) set to zero and every row scaled back to its former total
function withoutFirst(map) {
  const side = map.side, values = new Float32Array(map.values);
  for (let q = 0; q < side; q++) {
    let total = 0;
    for (let k = 0; k < side; k++) total += values[q * side + k];
    const rest = total - values[q * side], scale = rest > 0 ? total / rest : 0;
    values[q * side] = 0;
    for (let k = 1; k < side; k++) values[q * side + k] *= scale;
  }
  return Object.assign({}, map, {values: values});
}

function difference(after, before) {
  const values = new Float32Array(after.values.length);
  for (let i = 0; i < values.length; i++) values[i] = after.values[i] - before.values[i];
  return {side: after.side, values: values};
}

function panels(maps) {
  const weights = $(".hl-hide-first").checked ? maps.map(withoutFirst) : maps;
  return weights.length === 2 ? [weights[0], weights[1], difference(weights[1], weights[0])] : weights;
}

function colourBound(map) {
  const nonzero = [];
  for (const v of map.values) if (v !== 0) nonzero.push(Math.abs(v));
  if (!nonzero.length) return 1;
  nonzero.sort((a, b) => a - b);
  return nonzero[Math.min(nonzero.length - 1, Math.floor(SATURATION * nonzero.length))];
}

// what a panel's colours span: linear 0..bound, symmetric for differences, or log10 from its smallest weight
function colourRange(map, diverging) {
  const bound = colourBound(map);
  if (diverging) return {lo: -bound, hi: bound, log: false};
  if (!$(".hl-log").checked) return {lo: 0, hi: bound, log: false};
  let smallest = bound;
  for (const v of map.values) if (v > 0 && v < smallest) smallest = v;
  return {lo: Math.log10(Math.max(smallest, bound * 1e-6)), hi: Math.log10(bound), log: true};
}

function colourValue(v, range) { return range.log ? (v > 0 ? Math.log10(v) : null) : v; }

function colourBar(range, title, x) {
  const bar = {title: {text: title + (range.log ? " (log scale)" : ""), side: "right"}, x: x, xanchor: "left",
               len: 0.9, thickness: 12};
  if (range.log) {
    const ticks = [];
    for (let e = Math.ceil(range.lo); e <= Math.floor(range.hi); e++) ticks.push(e);
    bar.tickvals = ticks;
    bar.ticktext = ticks.map(e => String(Number(Math.pow(10, e).toPrecision(1))));
  }
  return bar;
}

function rows(map, f) {
  const out = [];
  for (let r = 0; r < map.side; r++) out.push(Array.from(map.values.subarray(r * map.side, (r + 1) * map.side), f));
  return out;
}

function imageSource(map, diverging, range) {
  const colours = LUT[diverging ? "RdBu_r" : "Blues"];
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = map.side;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(map.side, map.side);
  for (let i = 0; i < map.values.length; i++) {
    const v = colourValue(map.values[i], range);
    const c = v === null ? [255, 255, 255]
      : colours[Math.max(0, Math.min(255, Math.round((v - range.lo) / ((range.hi - range.lo) || 1) * 255)))];
    img.data.set([c[0], c[1], c[2], 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  return canvas.toDataURL("image/png");
}

function traces(map, index, title, x) {
  const diverging = index === 2, axis = index === 0 ? "" : String(index + 1);
  const range = colourRange(map, diverging);
  const scale = DATA.scales[diverging ? "RdBu_r" : "Blues"], bar = colourBar(range, title, x);
  if (BLOCK === 1) {
    const labels = DATA.tokens.map((t, i) => i + ": " + esc(shown(t)));
    return [{type: "heatmap", z: rows(map, v => colourValue(v, range)), customdata: rows(map, v => v), x: labels,
      y: labels, xaxis: "x" + axis, yaxis: "y", colorscale: scale, zmin: range.lo, zmax: range.hi, colorbar: bar,
      hovertemplate: "query %{y}<br>key %{x}<br>weight %{customdata:.5f}<extra></extra>"}];
  }
  return [{type: "image", source: imageSource(map, diverging, range), xaxis: "x" + axis, yaxis: "y",
           hovertemplate: "query block %{y}, key block %{x}<extra></extra>"},
          {type: "scatter", x: [null], y: [null], mode: "markers", xaxis: "x" + axis, yaxis: "y", hoverinfo: "skip",
           showlegend: false, marker: {colorscale: scale, cmin: range.lo, cmax: range.hi, color: [range.lo],
           showscale: true, colorbar: bar}}];
}

async function showHead(layer, head) {
  const key = layer + "," + head;
  if (!INDEX.has(key)) return;
  current = {layer: layer, head: head, maps: await headMaps(key)};
  await draw();
}

async function draw() {
  const shownMaps = panels(current.maps);
  current.shown = shownMaps;
  const hidden = $(".hl-hide-first").checked ? ", first token hidden" : "";
  const weight = (BLOCK === 1 ? "attention weight" : "mean attention weight per block") + hidden;
  const titles = DATA.after ? ["before surgery", "after surgery", "after \u2212 before"] : ["attention"];
  const width = 1 / titles.length;
  const data = [];
  shownMaps.forEach((m, i) => data.push(...traces(m, i, i === 2 ? "after \u2212 before" : weight,
                                                   (i + 1) * width - 0.06)));
  const note = BLOCK === 1 ? "token" : "token (" + BLOCK + "-token blocks, mean weight)";
  const layout = {height: 760, width: Math.max(600, Math.min(root.clientWidth, 140 + 640 * titles.length)),
    margin: {t: 40, l: 150, r: 20, b: 150}, annotations: [],
    yaxis: {title: {text: "query " + note}, autorange: "reversed", type: BLOCK === 1 ? "category" : "linear"}};
  titles.forEach((t, i) => {
    const name = "xaxis" + (i === 0 ? "" : i + 1);
    layout[name] = {domain: [i * width + 0.01, (i + 1) * width - 0.08], title: {text: "key " + note},
                    tickangle: -60, type: BLOCK === 1 ? "category" : "linear", anchor: "y"};
    if (BLOCK > 1) {
      const side = current.maps[0].side, ticks = [];
      for (let b = 0; b < side; b += Math.max(1, Math.floor(side / 8))) ticks.push(b);
      layout[name].tickvals = ticks; layout[name].ticktext = ticks.map(b => String(b * BLOCK));
      if (i === 0) { layout.yaxis.tickvals = ticks; layout.yaxis.ticktext = layout[name].ticktext; }
    }
    layout.annotations.push({text: t, showarrow: false, xref: "paper", yref: "paper",
                             x: i * width + width / 2 - 0.035, y: 1.04});
  });
  const plan = DATA.plan ? " \u2014 plan " + DATA.plan : "";
  $(".hl-detail-title").textContent = "layer " + current.layer + ", head " + current.head + plan;
  const div = $(".hl-detail");
  await Plotly.react(div, data, layout);
  if (!div.dataset.bound) {
    div.on("plotly_click", ev => selectQuery(ev.points[0]));
    div.on("plotly_hover", ev => describe(ev.points[0]));
    div.dataset.bound = "1";
  }
  colourText();
}

function cellIndex(point) {
  if (BLOCK === 1) return [point.pointIndex[0], point.pointIndex[1]];
  return [Math.floor(point.y + 0.5), Math.floor(point.x + 0.5)];
}

function blockRange(b) { return [b * BLOCK, Math.min((b + 1) * BLOCK, N) - 1]; }

// the interval of weights that one stored code stands for
function step(map, v) {
  const c = Math.round(Math.sqrt(v / (map.vmax || 1)) * map.levels), edge = e => map.vmax * Math.pow(e / map.levels, 2);
  return (c > 0 ? edge(c - 0.5) : 0).toPrecision(2) + "\u2013" + edge(Math.min(c + 0.5, map.levels)).toPrecision(2);
}

function describe(point) {
  if (!current) return;
  const [q, k] = cellIndex(point), map = current.shown[0], raw = current.maps[0];
  if (q < 0 || k < 0 || q >= map.side || k >= map.side) return;
  const weight = map.values[q * map.side + k].toPrecision(4);
  const stored = " (stored code " + step(raw, raw.values[q * raw.side + k]) + ")";
  const hidden = $(".hl-hide-first").checked ? "renormalised " : "";
  let text;
  if (BLOCK === 1) {
    text = "query " + q + " " + JSON.stringify(DATA.tokens[q]) + " \u2192 key " + k + " " +
           JSON.stringify(DATA.tokens[k]) + ": " + hidden + "weight " + weight + stored;
  } else {
    const [q0, q1] = blockRange(q), [k0, k1] = blockRange(k);
    text = "queries " + q0 + "\u2013" + q1 + " \u2192 keys " + k0 + "\u2013" + k1 + ": " + hidden + "mean weight " +
           weight + stored;
  }
  $(".hl-hover").textContent = text;
}

function selectQuery(point) {
  const panel = point ? Math.floor(point.curveNumber / (BLOCK === 1 ? 1 : 2)) : 0;  // pooled panels: image, colour bar
  query = point && current ? {row: cellIndex(point)[0], panel: DATA.after && panel > 0 ? 1 : 0} : null;
  colourText();
}

function colourText() {
  const panel = $(".hl-tokens"), title = $(".hl-tokens-title");
  panel.replaceChildren();
  let weights = null;
  if (query && current) {
    const map = current.shown[query.panel];
    weights = map.values.subarray(query.row * map.side, (query.row + 1) * map.side);
  }
  let top = 0;
  if (weights) for (const w of weights) top = Math.max(top, w);
  DATA.tokens.forEach((tok, i) => {
    const span = document.createElement("span"), cell = BLOCK === 1 ? i : Math.floor(i / BLOCK);
    span.textContent = tok;
    span.title = "token " + i;
    if (weights) {
      const w = weights[cell];
      span.style.backgroundColor = "rgba(31, 119, 180, " + (top > 0 ? w / top : 0).toFixed(3) + ")";
      span.title += ", weight " + w.toFixed(5);
      if (cell === query.row) span.className = "query";
    }
    panel.appendChild(span);
  });
  if (!weights) { title.textContent = "text (click a query row of the map)"; return; }
  const which = DATA.after ? (query.panel === 0 ? " before surgery" : " after surgery") : "";
  title.textContent = BLOCK === 1
    ? "attention of query " + query.row + " " + JSON.stringify(DATA.tokens[query.row]) + which + " over the text"
    : "attention of queries " + blockRange(query.row).join("\u2013") + which + " over the text (per key block)";
}

function gridOf(name) {
  return DATA.grids[name].map((row, l) => row.map((v, h) => INDEX.has(l + "," + h) ? v : null));
}

function topHead(name) {
  let best = null;
  gridOf(name).forEach((row, l) => row.forEach((v, h) => { if (v !== null && (!best || v > best[0])) best = [v, l, h]; }));
  return best ? [best[1], best[2]] : DATA.heads[0];
}

function showOverview(name) {
  const grid = gridOf(name), nLayers = grid.length, nHeads = grid[0].length;
  const height = Math.max(300, 22 * nLayers + 120), room = Math.floor((height - 40) / 7), label = DATA.labels[name];
  const ranked = [];
  grid.forEach((row, l) => row.forEach((v, h) => { if (v !== null) ranked.push([v, l, h]); }));
  ranked.sort((a, b) => b[0] - a[0]);
  const trace = {type: "heatmap", z: grid, x: [...Array(nHeads).keys()], y: [...Array(nLayers).keys()],
    colorscale: DATA.scales.Viridis, texttemplate: nHeads <= 16 ? "%{z:.2f}" : "", textfont: {size: 9},
    hovertemplate: "layer %{y}, head %{x}<br>" + esc(name) + " = %{z:.4f}<extra></extra>",
    colorbar: {title: {text: esc(label.length > room ? label.slice(0, room - 1) + "\u2026" : label), side: "right"}}};
  const axis = (title, n) => ({title: {text: title}, dtick: n <= 40 ? 1 : undefined});
  const layout = {title: {text: esc(name) + ": " + esc(DATA.model_id) + " (" + N + " tokens)"},
    xaxis: axis("head", nHeads), yaxis: axis("layer", nLayers), height: height,
    width: Math.min(1040, Math.max(420, 48 * nHeads + 220)), margin: {t: 50, l: 60, r: 20, b: 50},
    shapes: ranked.slice(0, 5).map(([v, l, h]) => ({type: "rect", x0: h - 0.5, x1: h + 0.5, y0: l - 0.5, y1: l + 0.5,
                                                    line: {color: "red", width: 2}}))};
  return Plotly.react($(".hl-overview"), [trace], layout);
}

async function init() {
  const select = $(".hl-score");
  for (const name of Object.keys(DATA.grids)) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
  select.value = DATA.default_score;
  select.addEventListener("change", () => showOverview(select.value));
  $(".hl-hide-first").addEventListener("change", () => current && draw());
  $(".hl-log").addEventListener("change", () => current && draw());
  await showOverview(select.value);
  $(".hl-overview").on("plotly_click", ev => showHead(ev.points[0].y, ev.points[0].x));
  const unit = BLOCK === 1 ? "one cell per token" : BLOCK + "-token blocks (mean weight per block)";
  $(".hl-summary").textContent = DATA.model_id + ": " + N + " tokens, " + DATA.heads.length + " heads, maps in " +
    unit + ", each weight stored in " + DATA.before.levels + " square-root steps of its map's largest weight" +
    (DATA.plan ? ", compared under plan " + DATA.plan : "");
  const linked = DATA.standalone ? /^#head=(\d+)\.(\d+)$/.exec(window.location.hash) : null;  // views.html#head=17.3
  let first = linked ? [Number(linked[1]), Number(linked[2])] : DATA.initial;
  if (!first || !INDEX.has(first[0] + "," + first[1])) first = topHead(DATA.default_score);
  await showHead(first[0], first[1]);
  root.dataset.ready = "1";
}
init();
};
"""

__all__ = ["page_payload", "show_view", "view_html", "write_view"]
