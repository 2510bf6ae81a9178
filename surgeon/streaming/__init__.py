"""Streaming heads (RazorAttention, DuoAttention): KV heads that keep only their first tokens and a recent
window. The settings (:mod:`.settings`), the rules that choose which KV heads keep the whole context and
the plans they make (:mod:`.rules`), DuoAttention's gate mix of full and streaming attention
(:mod:`.mixing`) and its training (:mod:`.gates`), and the cache that stores only what streaming heads
see (:mod:`.cache`). The edit itself is :class:`~headlab.surgeon.Stream`."""

from ...core.lazy import lazy_exports

_EXPORTS = {
    "GateSettings": "settings", "StreamingSettings": "settings",
    "candidates": "rules", "rule_ranking": "rules", "streaming_plan": "rules",
    "GateTraining": "gates", "StreamMix": "mixing",
    "StreamingLayer": "cache", "streaming_cache": "cache",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
