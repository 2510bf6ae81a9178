"""headlab.kernels: pure tensor ops with plain-torch references (imports nothing of headlab but its
foundation, :mod:`headlab.core`). Each op is one public module that chooses its backend (:mod:`._backend`)
and registers itself (:mod:`.ops`), a torch path, a Triton path where it pays, and its reference in
:mod:`.reference`."""

# Absolute: transformers probes for an installed package named ``kernels`` and, run from the repository,
# imports this folder under that name, where a relative import beyond it would fail.
from headlab.core.lazy import lazy_exports

_EXPORTS = {
    "all_ops": "ops",
    "attention_with_stats": "attention_stats",
    "AttentionInputs": "ops",
    "AttentionStats": "types",
    "BACKENDS": "_backend",
    "column_stats": "attention_stats",
    "ColumnStats": "types",
    "dense_codes": "sae_codes",
    "hybrid_attention": "linear",
    "linear_attention": "linear",
    "MAX_TOPK": "attention_stats",
    "Op": "ops",
    "partial_attention": "columns",
    "register_op": "ops",
    "row_key_probs": "columns",
    "sparse_decode": "sae_codes",
    "topk_encode": "sae_codes",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
