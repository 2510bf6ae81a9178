"""Folding a plan's output edits into the weights.

An output-stage edit that maps each head's output ``x`` to ``a·x + c`` at every position (its
:meth:`~.edits.base.Edit.affine`: head scaling, ablation, mean replacement) equals the output
projection with that head's input columns multiplied by ``a`` and ``W_h·c`` added to its bias. A
layer's output edits fold together (composed in plan order) or not at all; a projection without a
bias takes one where the family's config has a switch that adds biases to the attention projections
(``attention_bias`` and its other names), the other new biases zero. What cannot fold stays in the
plan, with the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..core.shape import ModelShape, model_shape, text_config
from .edits.base import Edit
from .plan import Plan
from .sites import attention_modules

PROJECTION_NAMES = ("o_proj", "dense", "c_proj", "out_proj")  # the output projection's names in transformers
BIAS_SWITCHES = ("attention_bias", "use_bias", "enable_bias", "bias")  # config switches that add projection biases


@dataclass
class Folded:
    """What :func:`fold_plan` made of a plan: ``state`` (parameter name -> new tensor, changed or added),
    ``config`` (text-config switches to set so that the added biases exist), the ``folded`` edits, the
    ``kept`` plan (every other edit, in plan order) and ``reasons`` (why each kept output edit stayed)."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, bool] = field(default_factory=dict)
    folded: list[Edit] = field(default_factory=list)
    kept: Plan = field(default_factory=Plan)
    reasons: list[str] = field(default_factory=list)


def output_projection(attention_module) -> tuple[str, torch.nn.Module] | None:
    """``(name, module)`` of the linear layer that receives an attention module's per-head outputs
    ``[..., heads · head_dim]``, or None where it has none of the usual names."""
    for name in PROJECTION_NAMES:
        module = getattr(attention_module, name, None)
        if isinstance(module, torch.nn.Module) and hasattr(module, "weight"):
            return name, module
    return None


def layer_affine(edits: list[Edit], shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The composed map ``(scale [H], shift [H, D])`` of one layer's output edits, in float64, or
    None when one of them is not such a map."""
    scale, shift = _identity(shape)
    for edit in edits:
        mapped = edit.affine(scale, shift)
        if mapped is None:
            return None
        scale, shift = mapped
    return scale, shift


def _identity(shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.ones(shape.n_heads, dtype=torch.float64),
            torch.zeros(shape.n_heads, shape.head_dim, dtype=torch.float64))


def fold_plan(model, plan: Plan) -> Folded:
    """Split ``plan`` into what folds into ``model``'s weights and what stays (see the module
    docstring); the model is not changed."""
    shape = model_shape(model)
    plan.validate(shape)
    names = {id(module): name for name, module in model.named_modules()}
    modules = {m.layer_idx: m for m in attention_modules(model)}
    result = Folded()
    folded_layers = set()
    for layer in sorted(plan.layers()):
        edits = plan.for_layer(layer, "output")
        if not edits:
            continue
        reason = _fold_layer(model, shape, modules[layer], names, edits, result)
        if reason is None:
            folded_layers.add(layer)
            result.folded += edits
        else:
            result.reasons.append(f"layer {layer}: {reason}")
    for layer, kind in sorted({(e.layer, e.kind) for e in plan.edits if e.stage != "output"}):
        result.reasons.append(f"layer {layer}: {kind} edits change the attention weights, so they run in the hook")
    kept = [e for e in plan.edits if not (e.stage == "output" and e.layer in folded_layers)]
    result.kept = Plan(kept, plan.model, plan.shape)
    return result


def _fold_layer(model, shape: ModelShape, module, names: dict, edits: list[Edit], result: Folded) -> str | None:
    """Fold one layer's output edits into ``result``; the reason they cannot fold, or None."""
    affine = layer_affine(edits, shape)
    if affine is None:
        kinds = sorted({e.kind for e in edits if e.affine(*_identity(shape)) is None})
        return f"{', '.join(kinds)} edits depend on the input, so they run in the hook"
    found = output_projection(module)
    if found is None:
        return f"{type(module).__name__} has no output projection named {' or '.join(PROJECTION_NAMES)}"
    name, projection = found
    prefix = f"{names[id(module)]}.{name}"
    weight = projection.weight.detach()
    columns_first = type(projection).__name__ == "Conv1D"  # GPT-2's Conv1D holds its weight as [in, out]
    width = weight.shape[0] if columns_first else weight.shape[1]
    if width != shape.n_heads * shape.head_dim:
        return f"its output projection takes {width} inputs, not heads × head_dim = {shape.n_heads * shape.head_dim}"
    scale, shift = affine
    bias = getattr(projection, "bias", None)
    if bias is None and bool(shift.any()):
        if f"{prefix}.bias" not in result.state:  # no switch set yet for an earlier layer
            switch = _bias_switch(model, f"{prefix}.bias")
            if switch is None:
                return (f"{type(model).__name__}'s output projection has no bias and its config has no switch that "
                        "adds one, so a replaced mean cannot fold")
            result.config[switch[0]] = True
            for added, tensor in switch[1].items():
                result.state.setdefault(added, tensor)
        bias = result.state[f"{prefix}.bias"]
    columns = scale.repeat_interleave(shape.head_dim).to(weight.dtype)
    result.state[f"{prefix}.weight"] = weight * (columns[:, None] if columns_first else columns[None, :])
    if bias is not None:
        per_head = weight.to(torch.float64).reshape(shape.n_heads, shape.head_dim, -1) if columns_first else \
            weight.to(torch.float64).T.reshape(shape.n_heads, shape.head_dim, -1)
        added = torch.einsum("hdo,hd->o", per_head, shift)  # Σ_h W_h · c_h
        result.state[f"{prefix}.bias"] = (bias.detach().to(torch.float64) + added).to(bias.dtype)
    return None


def _bias_switch(model, needed: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """``(switch, {name: zeros})``: the config switch whose setting adds ``needed`` (and only biases) to
    the model, with the zero tensors of every parameter it adds; None when no switch does."""
    own = model.state_dict()
    dtype = next(model.parameters()).dtype
    for switch in BIAS_SWITCHES:
        if getattr(text_config(model.config), switch, None) is not False:
            continue
        config = copy.deepcopy(model.config)
        setattr(text_config(config), switch, True)
        with torch.device("meta"):
            probe = type(model)(config)
        added = {name: tensor for name, tensor in probe.state_dict().items() if name not in own}
        if needed in added and all(name.endswith(".bias") for name in added):
            return switch, {name: torch.zeros(tensor.shape, dtype=dtype) for name, tensor in added.items()}
    return None


__all__ = ["BIAS_SWITCHES", "Folded", "PROJECTION_NAMES", "fold_plan", "layer_affine", "output_projection"]
