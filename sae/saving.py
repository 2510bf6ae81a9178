"""Saving and loading autoencoders in the layout SAELens reads (SPEC §6.7): a folder with
``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc``, ``b_dec``, and ``threshold`` for JumpReLU/BatchTopK), the input scale folded in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..surgeon.errors import InputFileError
from ..surgeon.files import atomic_path, claim_folder, read_text_file, write_json
from ..surgeon.settings import Choice, Integer, check_object
from .model import SparseAutoencoder
from .settings import ARCHITECTURES

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def hook_name(layer: int) -> str:
    """The TransformerLens hook of per-head outputs at ``layer``."""
    return f"blocks.{layer}.attn.hook_z"


def save_sae(sae: SparseAutoencoder, folder: str | Path, model_name: str, layer: int, module_path: str,
             context_size: int, provenance: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` (atomically each) into a
    folder that is new, empty or headlab's (``overwrite``: any). The scale ``c`` is folded in
    (``W_enc ← c·W_enc``, ``b_dec ← b_dec/c``, ``W_dec ← W_dec/c``; ``b_enc`` and ``threshold``
    unchanged), so the saved weights act on raw activations."""
    folder = claim_folder(folder, (CONFIG, WEIGHTS), overwrite, "autoencoder folder")
    c = sae.scale.item()
    tensors = {"W_enc": sae.W_enc.detach() * c, "W_dec": sae.W_dec.detach() / c, "b_enc": sae.b_enc.detach(),
               "b_dec": sae.b_dec.detach() / c}
    if sae.arch in ("jumprelu", "batchtopk"):
        tensors["threshold"] = sae.threshold.detach()
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({name: t.float().contiguous() for name, t in tensors.items()}, str(tmp))
    config = {
        "architecture": SAELENS_ARCHITECTURE[sae.arch],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z",
        "metadata": {"model_name": model_name, "hook_name": hook_name(layer), "hook_head_index": None,
                     "context_size": context_size, "prepend_bos": False},
        "headlab": {"arch": sae.arch, "layer": layer, "n_heads": sae.n_heads, "d_head": sae.d_head,
                    "module_path": module_path, "input_scale_folded": c, "provenance": provenance or {}},
    }
    if sae.arch in ("topk", "batchtopk"):
        config["k"] = sae.k
    write_json(folder / CONFIG, config)
    return folder


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
    try:
        config = json.loads(read_text_file(folder / CONFIG, "autoencoder config"))
    except json.JSONDecodeError as err:
        raise InputFileError(f"{where} is not JSON ({err.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("headlab"), dict):
        raise InputFileError(f"{where} was not written by headlab (no 'headlab' section)")
    sizes = check_object({key: config.get(key) for key in ("d_in", "d_sae")}, where,
                         {"d_in": Integer(1), "d_sae": Integer(1)})
    extra = check_object({key: config["headlab"].get(key) for key in ("arch", "layer", "n_heads", "d_head")},
                         f"{where}: headlab", {"arch": Choice(*ARCHITECTURES), "layer": Integer(0),
                                               "n_heads": Integer(1), "d_head": Integer(1)})
    if extra["n_heads"] * extra["d_head"] != sizes["d_in"]:
        raise InputFileError(f"{where}: d_in {sizes['d_in']} is not n_heads {extra['n_heads']} x d_head "
                             f"{extra['d_head']}")
    k = 1
    if extra["arch"] in ("topk", "batchtopk"):
        k = check_object({"k": config.get("k")}, where, {"k": Integer(1, sizes["d_sae"])})["k"]
    sae = SparseAutoencoder(sizes["d_in"], sizes["d_sae"], extra["arch"], k, extra["n_heads"], extra["d_head"])
    _load_weights(sae, folder / WEIGHTS)
    sae.eval()
    return sae, config


def _load_weights(sae: SparseAutoencoder, path: Path) -> None:
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise InputFileError(f"{path} cannot be read as safetensors ({' '.join(str(err).split())})") from None
    needed = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if sae.arch in ("jumprelu", "batchtopk") else [])
    with torch.no_grad():
        for name in needed:
            target = getattr(sae, name)
            if name not in tensors:
                raise InputFileError(f"{path} has no tensor {name!r}")
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise InputFileError(f"{path}: {name} is {tuple(tensors[name].shape)}, the config says "
                                     f"{tuple(target.shape)}")
            target.copy_(tensors[name])
