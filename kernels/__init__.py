"""headlab.kernels: pure tensor ops with plain-torch references (imports nothing else of headlab)."""

from .attention_stats import BACKENDS, MAX_TOPK, attention_with_stats, column_stats, resolve_backend
from .linear_attention import hybrid_attention, linear_attention
from .partial import partial_attention, row_key_probs
from .sae_ops import dense_codes, sparse_decode, topk_encode
from .types import AttentionStats, ColumnStats

__all__ = [
    "BACKENDS", "MAX_TOPK", "AttentionStats", "ColumnStats", "attention_with_stats", "column_stats",
    "dense_codes", "hybrid_attention", "linear_attention", "partial_attention", "resolve_backend", "row_key_probs", "sparse_decode", "topk_encode",
]
