"""The head atlas: its settings (:mod:`.settings`), every head's pattern descriptor, embedded and clustered
(:mod:`.build`, t-SNE in :mod:`.embedding`), its figures (:mod:`.figure`) and page and file (:mod:`.page`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {"AtlasSettings": "settings", "build_atlas": "build", "describe_heads": "build", "load_atlas": "page",
            "show_atlas": "page"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
