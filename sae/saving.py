"""Saving and loading autoencoders in SAELens 6.x's layout: a folder with ``cfg.json`` (SAELens'
fields, its ``metadata`` block, and headlab's own section) and ``sae_weights.safetensors``
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]`` with unit-norm rows, ``b_enc``, ``b_dec``, and
``threshold`` for JumpReLU/BatchTopK), acting on raw activations.

The training's input scale ``c`` (inputs were ``c·x``) moves into the codes: the saved biases and
thresholds are divided by ``c`` and ``W_enc``, ``W_dec`` are kept, so every pre-activation and code
is the trained one divided by ``c``. That is exact for every architecture (ReLU, TopK and the
thresholds are positively homogeneous, and a uniform scale keeps TopK's ranking) and leaves the
decoder rows at the unit norm training kept them at, as SAELens and SAEBench expect.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from ..core.errors import InputFileError
from ..core.files import atomic_path, claim_folder, parse_json, read_text_file, write_json
from ..core.kinds import Integer, Registered
from ..core.settings import check_object
from .architectures import ARCHITECTURES
from .model import SparseAutoencoder

WEIGHTS, CONFIG, SPARSITY = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"  # the SAELens release whose cfg.json layout this writes (and CI loads it with)
SPARSITY_EPS = 1e-10  # SAELens stores log10(firing frequency + this)


def hook_name(layer: int) -> str:
    """The TransformerLens hook of per-head outputs at ``layer``."""
    return f"blocks.{layer}.attn.hook_z"


def save_sae(sae: SparseAutoencoder, folder: str | Path, model_name: str, layer: int, module_path: str,
             context_size: int, provenance: dict | None = None, overwrite: bool = False, *,
             model_spec: str | None = None, prepend_bos: bool = False, dataset_path: str = "") -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` (atomically each) into a
    folder that is new, empty or headlab's (``overwrite``: any).

    ``model_name`` is the Hugging Face id the model's weights came from (what SAELens and
    Neuronpedia resolve); ``model_spec`` what headlab loads it by (a bundled name or a folder).
    ``prepend_bos`` says whether the training windows began with the tokenizer's BOS;
    ``dataset_path`` names the text (a local path here; empty for the standard-library docstrings).
    """
    folder = claim_folder(folder, (CONFIG, WEIGHTS), overwrite, "autoencoder folder")
    c = sae.scale.item()
    tensors = {"W_enc": sae.W_enc.detach(), "W_dec": sae.W_dec.detach(), "b_enc": sae.b_enc.detach() / c,
               "b_dec": sae.b_dec.detach() / c}
    if sae.architecture.threshold is not None:
        tensors["threshold"] = sae.threshold.detach() / c
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({name: t.float().contiguous() for name, t in tensors.items()}, str(tmp))
        weights_sha256 = hashlib.sha256(tmp.read_bytes()).hexdigest()
    config = {
        "architecture": sae.architecture.saelens,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z",
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                     "model_name": model_name, "hook_name": hook_name(layer), "hook_head_index": None,
                     "context_size": context_size, "prepend_bos": prepend_bos, "dataset_path": dataset_path,
                     "neuronpedia_id": None, "model_from_pretrained_kwargs": {}},
        "headlab": {"arch": sae.arch, "layer": layer, "n_heads": sae.n_heads, "d_head": sae.d_head,
                    "model_spec": model_spec or model_name, "module_path": module_path, "input_scale": c,
                    "weights_sha256": weights_sha256,
                    "codes": "the trained codes divided by input_scale", "provenance": provenance or {}},
    }
    if sae.architecture.uses_k:
        config["k"] = sae.k
    write_json(folder / CONFIG, config)
    return folder


def save_sparsity(folder: str | Path, frequency: torch.Tensor) -> Path:
    """``folder/sparsity.safetensors``: each latent's firing frequency as SAELens stores it,
    ``log10(frequency + 1e-10)`` under ``"sparsity"``."""
    path = Path(folder) / SPARSITY
    with atomic_path(path) as tmp:
        save_file({"sparsity": torch.log10(frequency.double() + SPARSITY_EPS).float().contiguous()}, str(tmp))
    return path


def load_sae(folder: str | Path) -> tuple[SparseAutoencoder, dict]:
    """``(sae, cfg)`` from a folder written by :func:`save_sae` (scale 1: weights already act on
    raw activations). Raises :class:`InputFileError` (one line) for a folder that is not one: a
    missing or malformed ``cfg.json``, weights that are missing, truncated or of the wrong shapes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder} is not a folder holding a saved autoencoder")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise InputFileError(f"{folder} is not a saved autoencoder: {name} is missing")
    where = str(folder / CONFIG)
    config = parse_json(read_text_file(folder / CONFIG, "autoencoder config"), where)
    if not isinstance(config, dict) or not isinstance(config.get("headlab"), dict):
        raise InputFileError(f"{where} was not written by headlab (no 'headlab' section)")
    sizes = check_object({key: config.get(key) for key in ("d_in", "d_sae")}, where,
                         {"d_in": Integer(1), "d_sae": Integer(1)})
    extra = check_object({key: config["headlab"].get(key) for key in ("arch", "layer", "n_heads", "d_head")},
                         f"{where}: headlab", {"arch": Registered(ARCHITECTURES, "SAE architectures"), "layer": Integer(0),
                                               "n_heads": Integer(1), "d_head": Integer(1)})
    recorded_hook = config.get("metadata", {}).get("hook_name") if isinstance(config.get("metadata"), dict) else None
    if recorded_hook != hook_name(extra["layer"]):
        raise InputFileError(f"{where}: its headlab section says layer {extra['layer']} but its hook_name is "
                             f"{recorded_hook!r}; the config was changed after headlab wrote it")
    if extra["n_heads"] * extra["d_head"] != sizes["d_in"]:
        raise InputFileError(f"{where}: d_in {sizes['d_in']} is not n_heads {extra['n_heads']} x d_head "
                             f"{extra['d_head']}")
    k = 1
    if ARCHITECTURES[extra["arch"]].uses_k:
        k = check_object({"k": config.get("k")}, where, {"k": Integer(1, sizes["d_sae"])})["k"]
    sae = SparseAutoencoder(sizes["d_in"], sizes["d_sae"], extra["arch"], k, extra["n_heads"], extra["d_head"])
    _load_weights(sae, folder / WEIGHTS, config["headlab"].get("weights_sha256"))
    sae.eval()
    return sae, config


def _load_weights(sae: SparseAutoencoder, path: Path, sha256: str | None) -> None:
    """The weights of ``path`` into ``sae``; refused when their SHA-256 is not the one the config
    records (folders of headlab before it recorded one are read unchecked)."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise InputFileError(f"{path} is not the weights its cfg.json records (SHA-256 differs): changed or damaged "
                             "after headlab wrote them")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise InputFileError(f"{path} cannot be read as safetensors ({' '.join(str(err).split())})") from None
    needed = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if sae.architecture.threshold is not None else [])
    with torch.no_grad():
        for name in needed:
            target = getattr(sae, name)
            if name not in tensors:
                raise InputFileError(f"{path} has no tensor {name!r}")
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise InputFileError(f"{path}: {name} is {tuple(tensors[name].shape)}, the config says "
                                     f"{tuple(target.shape)}")
            target.copy_(tensors[name])
