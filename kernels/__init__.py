"""headlab.kernels: pure tensor ops with plain-torch references (imports nothing of headlab but its
foundation, :mod:`headlab.core`)."""

# Absolute: transformers probes for an installed package named ``kernels`` and, run from the repository,
# imports this folder under that name, where a relative import beyond it would fail.
from headlab.core.lazy import lazy_exports

_EXPORTS = {
    "attention_with_stats": "attention_stats",
    "AttentionStats": "types",
    "BACKENDS": "attention_stats",
    "column_stats": "attention_stats",
    "ColumnStats": "types",
    "dense_codes": "sae_ops",
    "hybrid_attention": "linear_ops",
    "linear_attention": "linear_ops",
    "MAX_TOPK": "attention_stats",
    "partial_attention": "partial",
    "resolve_backend": "attention_stats",
    "row_key_probs": "partial",
    "sparse_decode": "sae_ops",
    "topk_encode": "sae_ops",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
