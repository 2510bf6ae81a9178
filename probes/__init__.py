"""headlab.probes: read-only measurement of attention (records, head scores, reports, views)."""

from ..core.lazy import lazy_exports

_EXPORTS = {
    "AttentionRecord": "record",
    "HeadScores": "headlab.core.head_scores",
    "load_text": "headlab.core.text",
    "PATTERN_SCORES": "scores",
    "pattern_scores": "scores",
    "record_attention": "record",
    "ReportSettings": "report_settings",
    "ScoreAccumulator": "scores",
    "stdlib_docstrings": "headlab.core.text",
    "token_windows": "headlab.core.text",
    "write_report": "report", "rewrite_report_pages": "report",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
