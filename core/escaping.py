"""Escaping for every page headlab writes: one helper per output context.

Any string that reaches a page (tokens, score names and descriptions, settings, file and model
names, plan names, generated responses) goes through the helper of the context it lands in:

* :func:`html_text` — element content (``<p>…</p>``);
* :func:`html_attribute` — a quoted attribute value (``title='…'``, ``href='…'``);
* :func:`element_id` — an ``id`` (and the plotly ``div_id`` that plotly's script looks up):
  letters, digits, ``-`` and ``_`` only, with a hash when anything had to be replaced;
* :func:`script_json` — JSON inside a ``<script>`` element (cannot close the element or open
  markup, and survives JavaScript's line terminators);
* :func:`plotly_text` — a title, label or hover text plotly renders (plotly reads a small HTML
  subset there, so ``&``, ``<`` and ``>`` are escaped and shown as themselves).
"""

from __future__ import annotations

import hashlib
import html
import json
import re

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def html_text(value) -> str:
    """``value`` as text inside an HTML element."""
    return html.escape(str(value), quote=False)


def html_attribute(value) -> str:
    """``value`` inside a quoted HTML attribute (single or double quotes)."""
    return html.escape(str(value), quote=True)


def element_id(*parts) -> str:
    """An element id built from ``parts`` (joined by ``-``) that is safe in HTML, CSS selectors and
    the JavaScript strings plotly writes; distinct inputs give distinct ids."""
    raw = "-".join(str(part) for part in parts)
    safe = _UNSAFE_ID.sub("_", raw)
    if safe != raw:
        safe += "-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()[:8]
    return safe if safe[:1].isalpha() else f"id-{safe}"


def script_json(value) -> str:
    """Compact JSON of ``value`` to place inside a ``<script>`` element."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda match: _SCRIPT_ESCAPES[match.group()], text)


def plotly_text(value) -> str:
    """``value`` as a plotly title, label or hover text (shown literally)."""
    return html.escape(str(value), quote=False)


__all__ = ["element_id", "html_attribute", "html_text", "plotly_text", "script_json"]
