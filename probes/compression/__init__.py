"""The evaluation of KV-cache compression (streaming heads, converted checkpoints): its settings
(:mod:`.settings`), the measurement (:mod:`.run`), its file (:mod:`.file`) and figure (:mod:`.figure`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {"CompressionSettings": "settings", "evaluate_compression": "run", "load_compression": "file"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
