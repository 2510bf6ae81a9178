"""headlab.probes: read-only measurement of attention (records, head scores, reports, views)."""

from .corpus import load_text, stdlib_docstrings, token_windows
from .record import AttentionRecord, record_attention
from .report import ReportSettings, write_report
from .scores import PATTERN_SCORES, HeadScores, ScoreAccumulator, pattern_scores

__all__ = [
    "PATTERN_SCORES",
    "AttentionRecord",
    "HeadScores",
    "ReportSettings",
    "ScoreAccumulator",
    "load_text",
    "pattern_scores",
    "record_attention",
    "stdlib_docstrings",
    "token_windows",
    "write_report",
]
