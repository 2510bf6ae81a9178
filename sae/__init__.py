"""headlab.sae: sparse autoencoders on per-head attention outputs (the input of ``o_proj``):
activation stores, the autoencoder, training, evaluation, head attribution and dashboards."""

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
    "evaluate_sae": "evaluate",
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
    "splice_function": "evaluate",
    "top_latents_per_head": "attribution",
    "Trainer": "training",
    "TrainSettings": "settings",
    "write_dashboard": "dashboard",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
