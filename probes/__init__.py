"""headlab.probes: read-only measurement of attention (records, head scores, reports, views)."""

from ..kernels.lazy_exports import lazy_exports

_EXPORTS = {
    "AttentionRecord": "record",
    "HeadScores": "scores",
    "load_text": "corpus",
    "PATTERN_SCORES": "scores",
    "pattern_scores": "scores",
    "record_attention": "record",
    "ReportSettings": "report_settings",
    "ScoreAccumulator": "scores",
    "stdlib_docstrings": "corpus",
    "token_windows": "corpus",
    "write_report": "report", "rewrite_report_pages": "report",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
