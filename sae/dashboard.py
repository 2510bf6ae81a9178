"""A standalone HTML feature dashboard: for chosen latents, the top-activating contexts (activating
token highlighted), an activation histogram and the head attribution bars. Every token string
is HTML-escaped; the page has no script."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..core.escaping import html_text
from ..core.files import GENERATOR_META, claim_file, write_text
from .activations import head_outputs
from .attribution import decoder_head_shares
from .model import SparseAutoencoder


@dataclass
class LatentExamples:
    """What the dashboard shows of one latent: ``top`` as ``(activation, window, position)``,
    best first; ``values`` every nonzero activation seen (for the histogram)."""

    latent: int
    top: list[tuple[float, int, int]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@torch.no_grad()
def collect_examples(model, sae: SparseAutoencoder, windows: Sequence[torch.Tensor], layer: int,
                     latents: Sequence[int], n_top: int = 10, exclude_first: bool = True,
                     progress: bool = False) -> dict[int, LatentExamples]:
    """Top-``n_top`` activating positions of each of ``latents`` over ``windows``."""
    bad = [i for i in latents if not 0 <= i < sae.d_sae]
    if bad:
        raise ValueError(f"latents {bad} outside 0..{sae.d_sae - 1}")
    found = {i: LatentExamples(i) for i in latents}
    heaps: dict[int, list] = {i: [] for i in latents}
    offset = 1 if exclude_first else 0
    for w, ids in enumerate(tqdm(windows, desc="feature contexts", disable=not progress, leave=False)):
        codes = sae.encode(head_outputs(model, ids, layer)[offset:])[:, list(latents)]  # [N, len(latents)]
        for column, latent in enumerate(latents):
            acts = codes[:, column]
            found[latent].values += acts[acts > 0].tolist()
            for position in (acts > 0).nonzero().flatten().tolist():
                item = (acts[position].item(), w, position + offset)
                heap = heaps[latent]
                (heapq.heappush if len(heap) < n_top else heapq.heappushpop)(heap, item)
    for latent, heap in heaps.items():
        found[latent].top = sorted(heap, reverse=True)
    return found


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
section { border-top: 1px solid #ccc; margin-top: 1.5em; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 2px 0; }
.hit { background: #f4a261; font-weight: bold; }
.bar { display: inline-block; height: 12px; background: #457b9d; }
td { padding: 1px 8px; }
"""


def _context(tokens: list[str], position: int, width: int) -> str:
    start, stop = max(0, position - width), min(len(tokens), position + 4)
    parts = [html_text(t) if i != position else f"<span class='hit'>{html_text(t)}</span>"
             for i, t in enumerate(tokens[start:stop], start)]
    return "".join(parts)


def _histogram_svg(values: list[float], bins: int = 30) -> str:
    if not values:
        return "<p>never active on these windows</p>"
    counts = torch.histc(torch.tensor(values), bins=bins)
    top = counts.max().item()
    bars = "".join(f"<rect x='{i * 10}' y='{60 - 60 * c / top:.1f}' width='9' height='{60 * c / top:.1f}' "
                   f"fill='#457b9d'/>" for i, c in enumerate(counts.tolist()))
    return (f"<svg width='{bins * 10}' height='62' role='img' aria-label='activation histogram'>{bars}</svg>"
            f"<div>activations {min(values):.3g} to {max(values):.3g}, {len(values)} nonzero</div>")


def write_dashboard(path: str | Path, sae: SparseAutoencoder, examples: dict[int, LatentExamples],
                    window_tokens: list[list[str]], title: str, context_width: int = 24, overwrite: bool = False) -> Path:
    """Write the dashboard page for ``examples`` (``window_tokens``: the token strings of each window);
    an existing file is replaced only when headlab wrote it, or with ``overwrite``."""
    claim_file(path, overwrite, "dashboard page")
    shares = decoder_head_shares(sae)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR_META}", f"<title>{html_text(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html_text(title)}</h1>"]
    for latent, found in examples.items():
        head_rows = "".join(f"<tr><td>head {h}</td><td><span class='bar' style='width:{300 * s:.1f}px'></span> "
                            f"{s:.3f}</td></tr>" for h, s in enumerate(shares[latent].tolist()))
        contexts = "".join(f"<div class='context'>{value:.3f} │ {_context(window_tokens[w], p, context_width)}</div>"
                           for value, w, p in found.top) or "<p>no activating context</p>"
        parts += [f"<section id='latent-{latent}'><h2>latent {latent}</h2>",
                  "<h3>top-activating contexts</h3>", contexts,
                  "<h3>activation histogram</h3>", _histogram_svg(found.values),
                  "<h3>head attribution (decoder-norm share)</h3>", f"<table>{head_rows}</table></section>"]
    parts.append("</body></html>")
    return write_text(path, "\n".join(parts))
