"""Saving and loading autoencoders in the layout SAELens reads (SPEC §6.7): a folder with
``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc``, ``b_dec``, and ``threshold`` for JumpReLU/BatchTopK), the input scale folded in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..surgeon.files import atomic_path, write_json
from .model import SparseAutoencoder

WEIGHTS, CONFIG = "sae_weights.safetensors", "cfg.json"
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def hook_name(layer: int) -> str:
    """The TransformerLens hook of per-head outputs at ``layer``."""
    return f"blocks.{layer}.attn.hook_z"


def save_sae(sae: SparseAutoencoder, folder: str | Path, model_name: str, layer: int, module_path: str,
             context_size: int, provenance: dict | None = None) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors`` (atomically each). The
    scale ``c`` is folded in (``W_enc ← c·W_enc``, ``b_dec ← b_dec/c``, ``W_dec ← W_dec/c``;
    ``b_enc`` and ``threshold`` unchanged), so the saved weights act on raw activations."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
    raw activations). Raises ``FileNotFoundError``/``ValueError`` for folders that are not one."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a saved autoencoder: {name} is missing")
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if "headlab" not in config:
        raise ValueError(f"{folder}/{CONFIG} was not written by headlab (no 'headlab' section)")
    extra = config["headlab"]
    sae = SparseAutoencoder(config["d_in"], config["d_sae"], extra["arch"], config.get("k", 1) or 1,
                            extra["n_heads"], extra["d_head"])
    tensors = load_file(folder / WEIGHTS)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            if name in tensors:
                getattr(sae, name).copy_(tensors[name])
    sae.eval()
    return sae, config
