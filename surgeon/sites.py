"""Where things are in a loaded model: the modules that call the attention interface, the decoder
blocks that hold them (and :func:`forwards_set`, which runs other code in their place for a while,
and :func:`announcing_layers`, which tells a long forward's progress block by block), the layers
that attend to the whole sequence, and the check that a model dispatches attention through the
interface at all. The bottom of
``surgeon``: it imports nothing of headlab beyond the shape and the errors."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..core.errors import UnsupportedModelError
from ..core.shape import text_config


def require_attention_interface(model) -> None:
    """Raise :class:`UnsupportedModelError` unless the model (or model class) dispatches attention
    through ``AttentionInterface``."""
    if getattr(model, "_supports_attention_backend", False):
        return
    name = model.__name__ if isinstance(model, type) else type(model).__name__
    raise UnsupportedModelError(
        f"{name} computes attention in its own code instead of dispatching through "
        "transformers' AttentionInterface, so headlab's attention hook would be silently ignored. "
        "Supported: architectures whose modeling code calls AttentionInterface "
        "(`_supports_attention_backend = True`), e.g. Llama, Mistral, Qwen2/3, Gemma, GPT-2, BERT."
    )


def attention_modules(model) -> list[torch.nn.Module]:
    """The modules that call the attention interface: those with an integer ``layer_idx`` and
    q/k projections or a ``scaling``, in the language model only."""
    text_cfg = text_config(model.config)
    found = []
    for module in model.modules():
        if not isinstance(getattr(module, "layer_idx", None), int):
            continue
        if getattr(module, "config", text_cfg) is not text_cfg:
            continue
        if hasattr(module, "scaling") or hasattr(module, "attention_head_size") or hasattr(module, "q_proj"):
            found.append(module)
    return found


def has_causal_attention(model) -> bool:
    """Whether ``model``'s attention is causal (each token sees only itself and earlier tokens)."""
    return bool(getattr(attention_modules(model)[0], "is_causal", False))


def full_attention_layers(config) -> list[int]:
    """Indices of the layers whose cache, as transformers builds it for ``config``, holds the whole
    sequence (not a sliding window or a chunk)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return [i for i, layer in enumerate(DynamicCache(config=config).layers) if type(layer) is DynamicLayer]


def decoder_layers(model) -> dict[int, torch.nn.Module]:
    """``{layer_idx: block}``: the entries of the model's layer lists (``nn.ModuleList``) that hold
    exactly one of :func:`attention_modules` (a Llama decoder layer, a BERT encoder layer)."""
    attention = {id(m): m.layer_idx for m in attention_modules(model)}
    blocks = {}
    for container in model.modules():
        if not isinstance(container, torch.nn.ModuleList):
            continue
        for block in container:
            inside = [attention[id(m)] for m in block.modules() if id(m) in attention]
            if len(inside) == 1:
                blocks[inside[0]] = block
    return blocks


def block_input(args, kwargs) -> torch.Tensor:
    """The residual stream ``[B, N, d_model]`` a decoder block's forward pre-hook receives."""
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def forwards_set(modules: list[torch.nn.Module], forwards: list[Callable]) -> Iterator[None]:
    """Inside, each of ``modules`` runs the matching one of ``forwards`` (set on the module itself,
    so its hooks still run around it). A forward set on a module itself before (accelerate's
    offloading wrapper, which loads the module's weights) is put back on exit."""
    previous = [module.__dict__.get("forward") for module in modules]
    try:
        for module, forward in zip(modules, forwards, strict=True):
            module.forward = forward
        yield
    finally:
        for module, own in zip(modules, previous):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own


@contextmanager
def announcing_layers(model, status: Callable[[str], None] | None, text: str = "",
                      backward: str | None = None) -> Iterator[None]:
    """Inside, ``status`` hears ``text`` at once and ``"text, layer i of n"`` as each decoder block's
    forward starts: where a long forward (a long prefill, a long sample's forward) has got to, with
    nothing changed in what it computes. With ``backward``, the backward pass through the outputs
    of the blocks run inside (later, outside too) says ``"backward, layer i of n"`` as the gradient
    reaches each block's output (hooks that read nothing and change nothing). Nothing at all when
    ``status`` is None."""
    if status is None:
        yield
        return
    blocks = decoder_layers(model)
    lead = f"{text}, " if text else ""

    def announce(line: str):
        def hook(*args) -> None:  # returns None: the inputs, outputs and gradients stay as they are
            status(line)
        return hook

    def announce_backward(line: str):
        def hook(module, args, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(announce(line))
        return hook

    handles = [block.register_forward_pre_hook(announce(f"{lead}layer {index + 1} of {len(blocks)}"))
               for index, block in blocks.items()]
    if backward is not None:
        handles += [block.register_forward_hook(announce_backward(f"{backward}, layer {index + 1} of {len(blocks)}"))
                    for index, block in blocks.items()]
    if text:
        status(text)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["announcing_layers", "attention_modules", "block_input", "decoder_layers", "forwards_set",
           "full_attention_layers", "has_causal_attention", "require_attention_interface"]
