"""headlab.kernels: pure tensor ops with plain-torch references (imports nothing else of headlab)."""

from .attention_stats import BACKENDS, MAX_TOPK, attention_with_stats, column_stats, resolve_backend
from .partial import partial_attention, row_key_probs
from .types import AttentionStats, ColumnStats

__all__ = [
    "BACKENDS", "MAX_TOPK", "AttentionStats", "ColumnStats", "attention_with_stats", "column_stats",
    "partial_attention", "resolve_backend", "row_key_probs",
]
