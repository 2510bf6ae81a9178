"""Interactive attention views: their settings (:mod:`.settings`), the pooled and quantised maps of every
head (:mod:`.data`), the figures (:mod:`.figure`) and the standalone page (:mod:`.page`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {"ViewSettings": "settings", "ViewData": "data", "gather_view": "data", "write_view": "page",
            "show_view": "page", "view": "figure"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
