"""Converting a causal LM's attention layers to linear/hybrid attention, and saving or reloading the
converted checkpoint.

A converted checkpoint is a directory: the base model's ``config.json`` and tokenizer, every weight
(base, LoRA-merged, feature maps, window weights) in ``model.safetensors``, and
``headlab_conversion.json`` with the :class:`LinearSettings` and the provenance (base model, training
summary). :func:`~headlab.surgeon.models.load_model` recognises the directory and rebuilds the same modules.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ...core.errors import HeadlabError, InputFileError, UnsupportedModelError
from ...core.files import claim_folder, parse_json, record_owned, usual_modes, write_json
from ...core.shape import model_shape
from ..sites import decoder_layers
from .layer import LinearAttention
from .settings import LinearSettings
from .support import convertible_layers, verify_layers

CONVERSION_FILE = "headlab_conversion.json"
WEIGHTS_FILE = "model.safetensors"


def convert(model, settings: LinearSettings, verify: bool = True):
    """Replace the ``self_attn`` of the chosen layers (every full-attention layer when
    ``settings.layers`` is None; :func:`.support.convertible_layers`) by :class:`LinearAttention` in
    place; returns the model. Other layers stay softmax. With ``verify``, each converted layer's
    softmax teacher must first reproduce its layer on a short probe (:func:`.support.verify_layers`)."""
    blocks = decoder_layers(model)
    layers = convertible_layers(model, settings.layers)
    shape = model_shape(model)
    _check_softmax_heads(settings, layers, shape.n_kv_heads)
    if verify:
        verify_layers(model, layers, settings)
    replacements = {index: LinearAttention(blocks[index].self_attn, settings, shape.n_heads, shape.n_kv_heads,
                                           shape.head_dim) for index in layers}
    for index, layer in replacements.items():
        blocks[index].self_attn = layer
    model.config.use_cache = True
    return model


def _check_softmax_heads(settings: LinearSettings, layers: list[int], n_kv_heads: int) -> None:
    """Refuse softmax heads outside the converted ``layers`` or beyond the model's KV heads."""
    outside = sorted({layer for layer, _ in settings.softmax_heads} - set(layers))
    if outside:
        raise UnsupportedModelError(f"softmax heads name layer(s) {outside}, which the conversion does not convert "
                                    f"(it converts {layers}); a softmax head lives inside a converted layer")
    beyond = sorted({kv for _, kv in settings.softmax_heads if kv >= n_kv_heads})
    if beyond:
        raise UnsupportedModelError(f"softmax heads name KV head(s) {beyond}; the model has {n_kv_heads} "
                                    f"(0–{n_kv_heads - 1})")


def converted_layers(model) -> dict[int, LinearAttention]:
    """``{layer_idx: module}`` of the converted layers."""
    return {m.layer_idx: m for m in model.modules() if isinstance(m, LinearAttention)}


def conversion_settings(model) -> LinearSettings | None:
    """The settings a model was converted with, or None for an unconverted model."""
    layers = converted_layers(model)
    return next(iter(layers.values())).settings if layers else None


def save_converted(model, tokenizer, directory: str | os.PathLike, provenance: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write a converted model as a reloadable checkpoint into ``directory``: a folder that is new,
    empty or headlab's (``overwrite``: any).

    Files are written beside the target and renamed into place; ``headlab_conversion.json`` goes
    last, so a directory is recognised as a converted checkpoint only once it is complete.
    """
    settings = conversion_settings(model)
    if settings is None:
        raise ValueError("the model has no converted layers")
    directory = claim_folder(directory, (CONVERSION_FILE,), overwrite, "checkpoint folder")
    with tempfile.TemporaryDirectory(prefix=".save.", dir=directory) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_safetensors_from(model, str(Path(tmp) / WEIGHTS_FILE))
        usual_modes(tmp)
        names = sorted(file.name for file in Path(tmp).iterdir())
        record_owned(directory, names)
        for name in names:
            os.replace(Path(tmp) / name, directory / name)
    write_json(directory / CONVERSION_FILE, {"format": "headlab-conversion/1", "settings": settings.to_dict(),
                                             "provenance": provenance or {}})
    return directory


def is_converted_directory(path: str | os.PathLike) -> bool:
    return (Path(path) / CONVERSION_FILE).is_file()


def read_conversion(path: str | os.PathLike) -> tuple[LinearSettings, dict]:
    """``(settings, provenance)`` recorded in a converted checkpoint; :class:`InputFileError` naming
    the file when it is not a readable record of a conversion."""
    marker = Path(path) / CONVERSION_FILE
    try:
        data = parse_json(marker.read_text(encoding="utf-8"), str(marker))
        settings = LinearSettings.from_dict(data["settings"])
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise TypeError("its provenance is not an object")
    except (OSError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
            HeadlabError) as error:
        raise InputFileError(f"{marker} is damaged: it does not record a headlab conversion ({error})") from None
    return settings, provenance


def check_converted(path: str | os.PathLike, config=None, weights: bool = True) -> LinearSettings:
    """The settings of the converted checkpoint at ``path``, once its files agree: the marker's layers
    and softmax heads exist in the config, and (``weights``) ``model.safetensors`` is whole (its size
    what its header declares) and holds every tensor at the shape the config and the conversion give
    it. Reads the config and the weights' header only; :class:`InputFileError` names the first
    disagreement."""
    path = Path(path)
    settings, _ = read_conversion(path)
    config = config if config is not None else AutoConfig.from_pretrained(path)
    shape = model_shape(config)
    named = sorted({*(settings.layers or ()), *(layer for layer, _ in settings.softmax_heads)})
    beyond = [layer for layer in named if layer >= shape.n_layers]
    heads = [kv for _, kv in settings.softmax_heads if kv >= shape.n_kv_heads]
    if beyond or heads:
        what = f"layer(s) {beyond}" if beyond else f"KV head(s) {heads}"
        raise InputFileError(f"{path / CONVERSION_FILE} names {what}, but the config has {shape.n_layers} layers of "
                             f"{shape.n_kv_heads} KV heads: the marker and the config are of different models")
    if not weights:
        return settings
    stored = _stored_shapes(path / WEIGHTS_FILE)
    with torch.device("meta"):
        skeleton = convert(AutoModelForCausalLM.from_config(config), settings, verify=False)
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    for name, size in stored.items():
        if expected.get(name) != size:
            wanted = "no such tensor" if name not in expected else f"shape {expected[name]}"
            raise InputFileError(f"{path / WEIGHTS_FILE} holds {name} of shape {size}, but the config and the "
                                 f"conversion give it {wanted}: the weights and the config are of different models")
    return settings


def _stored_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor: shape}`` from a safetensors file's header, after checking that the file is as long as
    the header says."""
    if not weights.is_file():
        raise InputFileError(f"{weights.parent} has no {weights.name}: the converted checkpoint is incomplete")
    try:
        with weights.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if not 0 < length <= min(weights.stat().st_size - 8, 100 * 2**20):
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("a header that is not an object")
        entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
        end = max((int(entry["data_offsets"][1]) for entry in entries.values()), default=0)
        shapes = {name: tuple(int(size) for size in entry["shape"]) for name, entry in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise InputFileError(f"{weights} is not a readable safetensors file ({error})") from None
    if weights.stat().st_size != 8 + length + end:
        raise InputFileError(f"{weights} is {weights.stat().st_size:,} bytes, its header declares {8 + length + end:,}: "
                             "the file is truncated or damaged")
    return shapes


def load_converted(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None):
    """``(model, tokenizer)`` of a converted checkpoint: its files checked against each other
    (:func:`check_converted`), the base architecture built from its config, converted with the
    recorded settings, then every weight loaded (strictly) from safetensors."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    settings = check_converted(path, config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    convert(model, settings, verify=False)  # verified when it was converted; these weights are not loaded yet
    try:
        load_safetensors_into(model, str(path / WEIGHTS_FILE), strict=True)
    except RuntimeError as error:  # a tensor the file lacks (the shapes were checked)
        raise InputFileError(f"{path / WEIGHTS_FILE} does not hold every weight of the converted model "
                             f"({str(error).splitlines()[0]})") from None
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model.eval(), tokenizer
