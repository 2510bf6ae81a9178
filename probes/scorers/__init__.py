"""What the products score heads with: attention records (:mod:`.record`), the pattern scores of maps and
statistics (:mod:`.patterns`), the registry of score families the report runs (:mod:`.families`) and
each family's scorer (sinks, retrieval and its needles, context divergence, induction and importance,
RazorAttention's scores, linear probes), with their settings (:mod:`.settings`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {
    "AttentionRecord": "record", "record_attention": "record", "record_statistics": "record",
    "PATTERN_SCORES": "patterns", "pattern_scores": "patterns", "ScoreAccumulator": "patterns",
    "SCORE_FAMILIES": "families", "FamilyInputs": "families", "score_family": "families",
    "NeedleSettings": "settings", "SinkSettings": "settings",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
