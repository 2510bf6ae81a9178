"""headlab.sae: sparse autoencoders on per-head attention outputs (the input of ``o_proj``):
activation stores, the autoencoder, training, evaluation, head attribution and dashboards."""

from .activations import CachedActivations, ModelActivations, ShuffleBuffer, cache_activations, head_outputs
from .attribution import decoder_head_shares, direct_feature_attribution, head_shares, top_latents_per_head
from .dashboard import collect_examples, write_dashboard
from .evaluate import evaluate_sae, splice_function
from .model import ARCHITECTURES, SparseAutoencoder
from .saving import hook_name, load_sae, save_sae
from .training import TrainSettings, Trainer, geometric_median, initialise

__all__ = [
    "ARCHITECTURES", "CachedActivations", "ModelActivations", "ShuffleBuffer", "SparseAutoencoder", "TrainSettings",
    "Trainer", "cache_activations", "collect_examples", "decoder_head_shares", "direct_feature_attribution",
    "evaluate_sae", "geometric_median", "head_outputs", "head_shares", "hook_name", "initialise", "load_sae",
    "save_sae", "splice_function", "top_latents_per_head", "write_dashboard",
]
