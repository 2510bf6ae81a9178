"""headlab.sae: sparse autoencoders on per-head attention outputs (the input of ``o_proj``):
activation stores, the autoencoder and its architectures, training, metrics, head attribution and dashboards;
whole runs (:func:`train_sae`, :func:`evaluate_saved`, :func:`feature_dashboards`) in :mod:`.pipeline`."""

from ..core.lazy import lazy_exports

_EXPORTS = {
    "ARCHITECTURES": "architectures",
    "Architecture": "architectures",
    "register_architecture": "architectures",
    "cache_activations": "activations",
    "CachedActivations": "activations",
    "collect_examples": "dashboard",
    "decoder_head_shares": "attribution",
    "direct_feature_attribution": "attribution",
    "evaluate_sae": "metrics",
    "geometric_median": "training",
    "head_outputs": "activations",
    "head_shares": "attribution",
    "hook_name": "saving",
    "initialise": "training",
    "load_sae": "saving",
    "ModelActivations": "activations",
    "save_sae": "saving",
    "save_sparsity": "saving",
    "ShuffleBuffer": "activations",
    "SparseAutoencoder": "model",
    "splice_function": "metrics",
    "Trainer": "training",
    "TrainSettings": "settings",
    "train_sae": "pipeline",
    "evaluate_saved": "pipeline",
    "feature_dashboards": "pipeline",
    "write_dashboard": "dashboard",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
