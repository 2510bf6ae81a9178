"""headlab.kernels: pure tensor ops with plain-torch references (imports nothing else of headlab)."""

from importlib import import_module

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


def __getattr__(name):  # exports load on first use: importing the package (e.g. for the CLI) costs no torch
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = import_module(f".{module}", __name__)
    return loaded if module == name else getattr(loaded, name)


def __dir__():
    return __all__
