"""Which attention layers a conversion can replace, checked before anything is replaced.

A converted layer rebuilds the layer's softmax attention from its parts: ``q/k/v/o_proj``, the
query/key norms some families apply (per head: Qwen3, Gemma 3, Cohere; over the whole projection:
OLMo 2), the family's rotary function and the layer's ``scaling``; it attends causally to every
earlier token. Layers that compute anything else are refused, each with its reason: a sliding
window or chunk (the cache keeps a bounded window already; the converted layer would see the whole
context), soft-capped logits, learned sinks or other parameters of the attention module's own,
bidirectional attention, other submodules.

:func:`verify_layers` then proves it on the weights: one short forward of the model records each
chosen layer's input and output, and the converted layer's softmax teacher must reproduce that
output, which catches what no attribute shows (a layer without rotary positions, a scaling the
modeling code applies elsewhere).
"""

from __future__ import annotations

import sys

import torch

from ...core.errors import UnsupportedModelError
from ...core.shape import model_shape
from ..sites import decoder_layers, full_attention_layers, has_causal_attention, require_attention_interface
from .layer import LinearAttention, norm_site

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
NORMS = ("q_norm", "k_norm")
PROBE_TOKENS = 24
# The rebuilt softmax and the layer run the same operations but for the attention call, whose rounding
# stays within a few units of the dtype's roundoff (2^-8 relative in bf16); a layer computed another
# way misses by far more.
REPRODUCTION_TOLERANCE = 2**-6


def convertible_layers(model, layers=None) -> list[int]:
    """The layers a conversion replaces: ``layers``, or every full-attention layer when None; raises
    :class:`UnsupportedModelError` naming a layer that cannot be converted and why. Reads the
    modules only (a model on the meta device will do)."""
    require_attention_interface(model)  # what the hook cannot see, a conversion cannot verify
    blocks = decoder_layers(model)
    already = sorted(index for index, block in blocks.items()
                     if isinstance(getattr(block, "self_attn", None), LinearAttention))
    if already:  # one checkpoint records one conversion's settings
        raise UnsupportedModelError(f"the model already has converted layers ({', '.join(map(str, already))}); "
                                    "convert its base model, once, with every layer to convert")
    if not has_causal_attention(model):
        raise UnsupportedModelError("linear-attention conversion needs a causal language model")
    shape = model_shape(model)
    full = full_attention_layers(model.config)
    if layers is None:
        if not full:
            raise UnsupportedModelError("every layer of this model attends through a sliding window or chunk; "
                                        "conversion replaces full-attention layers only")
        layers = full
    bad = [i for i in layers if not 0 <= i < shape.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {shape.n_layers} layers "
                         f"(0–{shape.n_layers - 1})")
    for index in layers:
        attention = getattr(blocks.get(index), "self_attn", None)
        reason = (("its decoder layer holds its attention under another name than self_attn "
                   "(conversion supports Llama-style decoder layers)") if attention is None
                  else unsupported_reason(attention, model.config, shape, index in full))
        if reason:
            raise UnsupportedModelError(f"layer {index} cannot be converted: {reason}")
    return sorted(layers)


def check_config(config, layers=None) -> list[int]:
    """:func:`convertible_layers` of the model ``config`` describes, built on the meta device (no
    weights: a check before anything is loaded)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return convertible_layers(skeleton, layers)


def unsupported_reason(attention, config, shape, full_attention: bool) -> str | None:
    """Why ``attention`` (one layer's module) cannot be converted, or None."""
    name = type(attention).__name__
    children = {child for child, _ in attention.named_children()}
    if not set(PROJECTIONS) <= children or children - set(PROJECTIONS) - set(NORMS):
        return (f"{name} has submodules {sorted(children)}; conversion supports attention made of "
                f"{', '.join(PROJECTIONS)} (and {' or '.join(NORMS)}) with rotary positions")
    for norm, heads in (("q_norm", shape.n_heads), ("k_norm", shape.n_kv_heads)):
        if norm in children and norm_site(getattr(attention, norm), heads, shape.head_dim) is None:
            weight = getattr(getattr(attention, norm), "weight", None)
            return (f"its {norm} has weights of shape {None if weight is None else tuple(weight.shape)}, "
                    "neither per head nor per projection")
    own = [parameter for parameter, _ in attention.named_parameters(recurse=False)]
    if own:
        return f"{name} has parameters of its own ({', '.join(own)}: learned attention sinks, for example)"
    if not getattr(attention, "is_causal", True):
        return "it attends bidirectionally"
    if not full_attention:
        return "it attends through a sliding window or chunk (its cache is bounded already)"
    if getattr(attention, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return "its attention logits are soft-capped"
    if getattr(attention, "attn_temperature_tuning", False):
        return "its attention scales with the position (temperature tuning)"
    if getattr(attention, "scaling", None) is None:
        return f"{name} has no scaling attribute"
    if getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None) is None:
        return f"the module of {name} has no apply_rotary_pos_emb"
    return None


@torch.no_grad()
def verify_layers(model, layers: list[int], settings) -> None:
    """Check that a conversion of each of ``layers`` under ``settings`` (:class:`.LinearSettings`)
    rebuilds its layer's softmax output on a short probe through the model's own forward; raises
    :class:`UnsupportedModelError` for the first that does not. Nothing is replaced (the global
    random state is left as it was)."""
    shape = model_shape(model)
    blocks = decoder_layers(model)
    with torch.random.fork_rng(devices=[]):
        replacements = {i: LinearAttention(blocks[i].self_attn, settings, shape.n_heads, shape.n_kv_heads,
                                           shape.head_dim) for i in layers}
    seen: dict[int, tuple] = {}

    def recorder(index):
        def record(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen[index] = (hidden, kwargs.get("position_embeddings"), output[0])
        return record

    handles = [blocks[i].self_attn.register_forward_hook(recorder(i), with_kwargs=True) for i in replacements]
    training = model.training
    try:
        embeddings = model.get_input_embeddings()
        probe = torch.randint(0, embeddings.num_embeddings, (1, PROBE_TOKENS),
                              generator=torch.Generator().manual_seed(0))
        model.eval()  # no dropout: the layer's output is its attention alone
        model(input_ids=probe.to(embeddings.weight.device), use_cache=False)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    for index, layer in replacements.items():
        hidden, position_embeddings, want = seen[index]
        try:
            got = layer.softmax_forward(hidden, position_embeddings).float()
        except (RuntimeError, ValueError, TypeError) as error:
            raise UnsupportedModelError(f"layer {index} cannot be converted: its softmax attention cannot be rebuilt "
                                        f"from q/k/v/o_proj and rotary positions ({error})") from error
        difference, scale = (got - want.float()).abs().max().item(), want.float().abs().max().item()
        if not difference <= REPRODUCTION_TOLERANCE * scale:
            raise UnsupportedModelError(
                f"layer {index} cannot be converted: rebuilt from its projections, norms and rotary positions, its "
                f"softmax attention differs from the layer's own (largest difference {difference:.3g}, outputs up to "
                f"{scale:.3g}): the family computes this layer's attention another way (no rotary positions on it, "
                "for example)")


__all__ = ["check_config", "convertible_layers", "unsupported_reason", "verify_layers"]
