"""headlab.probes: measurement of attention, one wing per product. The scorers (:mod:`.scorers`: attention
records, pattern scores and the score families the report runs) and the figures' shared base
(:mod:`.figures`) serve five products, each owning its settings, file format, figure and page: the
head-importance report (:mod:`.report`), attention views (:mod:`.views`), the masking validation
(:mod:`.validation`), the KV-cache compression evaluation (:mod:`.compression`) and the head atlas
(:mod:`.atlas`)."""

from ..core.lazy import lazy_exports

_EXPORTS = {
    "AttentionRecord": "scorers", "record_attention": "scorers", "pattern_scores": "scorers",
    "PATTERN_SCORES": "scorers", "ScoreAccumulator": "scorers", "score_family": "scorers",
    "ReportSettings": "report", "write_report": "report", "rewrite_report_pages": "report", "show_score": "report",
    "ViewSettings": "views", "gather_view": "views", "write_view": "views", "show_view": "views",
    "ValidationSettings": "validation", "validate_score": "validation",
    "CompressionSettings": "compression", "evaluate_compression": "compression",
    "AtlasSettings": "atlas", "build_atlas": "atlas", "describe_heads": "atlas",
    "load_atlas": "atlas", "show_atlas": "atlas",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
