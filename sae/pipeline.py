"""Whole autoencoder runs, as the ``sae`` commands run them and a Python user calls them: train an
autoencoder on one layer's head outputs and save it with its held-out metrics (:func:`train_sae`),
measure a saved one on text (:func:`evaluate_saved`), and write the dashboard of its latents
(:func:`feature_dashboards`)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.distributed import rank_and_world
from ..core.files import claim_folder, write_json
from ..core.shape import model_shape
from ..core.text import TextWindows, load_text, special_tokens, token_windows, train_eval_windows
from .activations import MANIFEST, CachedActivations, ModelActivations, ShuffleBuffer, cache_activations
from .dashboard import collect_examples, write_dashboard
from .metrics import evaluate_sae
from .model import SparseAutoencoder
from .saving import load_sae, save_sae, save_sparsity
from .settings import TrainSettings
from .training import Trainer

TRAIN_ENTRIES = ("cfg.json", "sae_weights.safetensors", "metrics.json", "sparsity.safetensors", "checkpoints")
METRICS_FORMAT = "headlab-sae-metrics/1"


def train_sae(model, tokenizer, layer: int, out: str | Path, settings: TrainSettings | None = None,
              text: TextWindows | None = None, *, cache: str | Path | None = None, model_spec: str = "",
              overwrite: bool = False, progress: bool = True) -> dict:
    """Train an autoencoder on the head outputs of ``layer`` (the input of its ``o_proj``) over windows of
    ``text`` (``text.tokens`` tokens each; ``text.windows`` more are held out), as ``settings`` say, and
    save it into ``out`` in SAELens' layout (``cfg.json``, ``sae_weights.safetensors``) with
    ``metrics.json`` and ``sparsity.safetensors`` measured on the held-out windows. Checkpoints go to
    ``out/checkpoints``; a killed run resumes from them. ``cache``: a folder of the training activations,
    written on the first run and read by later ones (one process only). Under torchrun every rank trains
    on its shard of the windows; rank 0 saves. Returns the metrics (empty on other ranks)."""
    settings, text = settings or TrainSettings(), text or TextWindows(windows=16, tokens=128)
    rank, world = rank_and_world()
    torch.manual_seed(settings.seed)
    n_train = train_windows(settings, text)
    train, held_out = train_eval_windows(tokenizer, text.text_path, n_train, text.windows, text.tokens, settings.seed)
    out = claim_folder(out, TRAIN_ENTRIES, overwrite, "--out folder")
    start = time.perf_counter()
    progress = progress and rank == 0
    identity = cache_identity(model_spec or model.config.name_or_path, layer, text, settings)
    source = _activations(model, train, layer, cache, identity, overwrite, rank, world, progress)
    batch = settings.batch_tokens // world
    capacity = max(min(settings.buffer_tokens, settings.train_tokens) // world, 2 * batch)  # no more than the run uses
    buffer = ShuffleBuffer(source, batch, capacity, settings.seed + rank, progress)
    shape = model_shape(model)
    d_in = shape.n_heads * shape.head_dim
    sae = SparseAutoencoder(d_in, settings.expansion * d_in, settings.arch, settings.k, shape.n_heads, shape.head_dim,
                            settings.seed)
    Trainer(sae, buffer, settings, out / "checkpoints").run(progress)
    if rank > 0:
        return {}
    wall = time.perf_counter() - start
    from ..surgeon import attention_modules
    from ..surgeon.models import hub_id

    module = f"{type(attention_modules(model)[layer]).__name__} (layer {layer}) o_proj input"
    provenance = {"settings": {**settings.__dict__}, "tokens_trained": settings.steps * settings.batch_tokens,
                  "train_windows": len(train), "epochs_over_windows": buffer.epoch, "context": text.tokens,
                  "wall_s": round(wall, 1), "world_size": world, "text": text.source}
    save_sae(sae, out, hub_id(model_spec) if model_spec else model.config.name_or_path, layer, module, text.tokens,
             provenance,
             overwrite=overwrite, model_spec=model_spec, prepend_bos=bool(special_tokens(tokenizer)[0]),
             dataset_path=text.text_path or "")
    if progress:
        tqdm.write(f"measuring the autoencoder on {len(held_out)} held-out windows of {text.tokens} tokens",
                   file=sys.stderr)
    metrics, frequency = evaluate_sae(model, sae, held_out, layer, progress=progress)
    metrics.update({"format": METRICS_FORMAT, "held_out_windows": len(held_out), "train_wall_s": round(wall, 1)})
    write_json(out / "metrics.json", metrics)
    save_sparsity(out, frequency)
    return metrics


def train_windows(settings: TrainSettings, text: TextWindows) -> int:
    """The training windows ``settings.train_tokens`` take (the first token of a window is not encoded)."""
    return math.ceil(settings.train_tokens / (text.tokens - 1))


def cache_identity(model_spec: str, layer: int, text: TextWindows, settings: TrainSettings) -> dict:
    """What a training run's activations are, as an activation cache records it and the run compares it
    (:class:`~headlab.sae.activations.CachedActivations`): model, layer, text, windows and seed."""
    source = str(Path(text.text_path).expanduser().resolve()) if text.text_path else text.source
    return {"model": model_spec, "layer": layer, "exclude_first": True, "text": source, "context": text.tokens,
            "train_windows": train_windows(settings, text), "held_out_windows": text.windows, "seed": settings.seed}


def _activations(model, train, layer: int, cache, identity: dict, overwrite: bool, rank: int, world: int,
                 progress: bool = True):
    """The training activations: from the cache folder (written first when it holds none; one that
    holds other activations than ``identity`` is refused), or from the model, each rank its shard of
    the windows."""
    if cache is None or world > 1:
        return ModelActivations(model, train[rank::world], layer)
    cache = Path(cache)
    if (cache / MANIFEST).exists():
        return CachedActivations(cache, identity)
    claim_folder(cache, (), overwrite, "--cache folder")
    return cache_activations(ModelActivations(model, train, layer), cache, identity=identity, progress=progress)


def evaluate_saved(folder: str | Path, model, tokenizer, text: TextWindows | None = None, seed: int = 1,
                   progress: bool = True) -> dict:
    """The metrics of the autoencoder saved in ``folder`` on the windows of ``text`` (placed with ``seed``;
    training drew its windows with seed 0 by default): reconstruction, sparsity, and for a causal LM the
    loss recovered with the autoencoder spliced in."""
    text = text or TextWindows(windows=16, tokens=128)
    sae, config = load_sae(folder)
    windows = token_windows(tokenizer, load_text(text.text_path), text.windows, text.tokens, seed)
    metrics, _ = evaluate_sae(model, sae, windows, config["headlab"]["layer"], progress=progress)
    metrics.update({"format": METRICS_FORMAT, "windows": text.windows, "context": text.tokens, "seed": seed,
                    "sae": str(folder)})
    return metrics


def feature_dashboards(folder: str | Path, model, tokenizer, out: str | Path, latents: list[int] | None = None,
                       top: int = 8, text: TextWindows | None = None, seed: int = 1, overwrite: bool = False,
                       progress: bool = True) -> Path:
    """The dashboard page of the autoencoder saved in ``folder``: for each of ``latents`` (default: the
    ``top`` most frequently active on a quarter of the windows) its top-activating contexts over the
    windows of ``text`` (placed with ``seed``), its firing histogram and the heads its decoder reads."""
    text = text or TextWindows(windows=32, tokens=128)
    sae, config = load_sae(folder)
    layer = config["headlab"]["layer"]
    windows = token_windows(tokenizer, load_text(text.text_path), text.windows, text.tokens, seed)
    if latents is None:
        sample = windows[: max(1, len(windows) // 4)]
        if progress:
            tqdm.write(f"finding the {top} most frequently active latents on {len(sample)} of the {len(windows)} "
                       "windows", file=sys.stderr)
        _, frequency = evaluate_sae(model, sae, sample, layer, progress=progress)
        latents = frequency.topk(top).indices.tolist()  # the most frequently active latents
    examples = collect_examples(model, sae, windows, layer, latents, progress=progress)
    tokens = [[tokenizer.decode([i]) for i in w[0].tolist()] for w in windows]
    title = f"SAE features: {config['metadata']['model_name']} {config['metadata']['hook_name']}"
    return write_dashboard(out, sae, examples, tokens, title, overwrite=overwrite)


__all__ = ["METRICS_FORMAT", "TRAIN_ENTRIES", "evaluate_saved", "feature_dashboards", "train_sae"]
