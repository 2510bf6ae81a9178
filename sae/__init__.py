"""headlab.sae: sparse autoencoders on per-head attention outputs (the input of ``o_proj``):
activation stores, the autoencoder, training, evaluation, head attribution and dashboards."""

from importlib import import_module

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


def __getattr__(name):  # exports load on first use: importing the package (e.g. for the CLI) costs no torch
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = import_module(f".{module}", __name__)
    return loaded if module == name else getattr(loaded, name)


def __dir__():
    return __all__
