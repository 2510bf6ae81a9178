"""The attention view's settings (``headlab view``): what it records and how large its page may grow; one
definition for the library and the command line. Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.kinds import Choice, Indices, Integer, Kind, Maybe, Number
from ...core.settings import check_settings, setting


class HeadRef(Kind):
    """``LAYER.HEAD`` such as ``17.3`` (a negative layer counts from the end)."""

    metavar = "L.H"

    def parse(self, text: str):
        layer, dot, head = text.strip().partition(".")
        try:
            return self.check((int(layer), int(head)) if dot else None)
        except ValueError:
            raise ValueError(f"{text!r} is not LAYER.HEAD such as 17.3") from None

    def check(self, value):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{value!r} is not a (layer, head) pair")
        return Integer().check(value[0]), Integer(0).check(value[1])


@dataclass
class ViewSettings:
    """What the attention view records and how large its page may grow."""

    layers: tuple | None = setting(None, "layers to record, e.g. 10-14, 3,7 or -2--1 (default all)",
                                   kind=Maybe(Indices()), flag="--layers")
    head: tuple[int, int] | None = setting(None, "head to open first, e.g. 17.3 (default: the top previous-token "
                                                 "head)", kind=Maybe(HeadRef()), flag="--head")
    max_tokens: int = setting(8192, "refuse longer texts", kind=Integer(2), flag="--max-tokens")
    max_payload_mb: float = setting(20.0, "cap on the page's encoded maps in MB; pooling coarsens to fit",
                                    kind=Number(0.01), flag="--max-payload-mb")
    plotlyjs: str = setting("file", "where the page gets plotly.js: 'file' writes plotly-VERSION.min.js once beside it "
                                    "(shared by the pages there; opens offline), 'inline' puts it in the page (one "
                                    "self-contained file, +4.7 MB), 'cdn' links cdn.plot.ly (needs the network)",
                            kind=Choice("file", "inline", "cdn"), flag="--plotlyjs")  # figures.PLOTLY_SOURCES

    def __post_init__(self):
        check_settings(self)


__all__ = ["HeadRef", "ViewSettings"]
