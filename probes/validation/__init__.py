"""The masking validation of a head score: its settings (:mod:`.settings`), which heads are masked and how
(:mod:`.masking`), the measurement (:mod:`.run`), its statistics (:mod:`.statistics`), its file
(:mod:`.file`) and figure (:mod:`.figure`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {"ValidationSettings": "settings", "MaskingSettings": "settings", "validate_score": "run",
            "load_curves": "file"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
