"""The one attention function headlab registers with transformers, and the context manager that installs it.

``attach(model, plan, taps)`` switches the model to the registered ``"headlab"`` implementation,
hands every attention module the session (plan, taps, recording) and restores the previous
implementation on exit, also after an exception. Layers with nothing to do delegate to the
unmodified SDPA path, so an empty plan reproduces the untouched model's logits exactly.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..kernels import attention_with_stats, row_key_probs
from . import attention_math, editing
from .linear_layer import LinearAttention
from .models import ModelShape, model_shape, require_attention_interface, text_config
from .plan import Plan, PlanError
from .request import Request, RequestState, span_mask
from .taps import MapBudgetError, Recording, Taps

HOOK_NAME = "headlab"

Splice = Callable[[torch.Tensor], torch.Tensor]  # per-head outputs [B, N, H, D] -> replacement
_SESSION_ATTR = "_headlab_session"


class Session:
    """Per-request state the attention function reads: the plan, taps, gates, the request's
    inputs and what its prefill fixed (``state``), and the recording."""

    def __init__(self, shape: ModelShape, plan: Plan, taps: Taps, gates: torch.Tensor | None,
                 request: Request | None = None, splice: Mapping[int, Splice] | None = None):
        self.shape = shape
        self.splice = dict(splice or {})
        self.plan = plan
        self.taps = taps
        self.gates = gates  # [n_layers, n_heads] multiplier on head outputs (may require grad)
        self.request = request or Request()
        self.state = RequestState()
        self.recording = Recording()
        self._prefilled_layers: set[int] = set()
        self._map_bytes_this_call = 0
        self._mask_cache: tuple | None = None  # (mask, shape, is_causal) -> decomposition

    def set_taps(self, taps: Taps) -> None:
        """Record ``taps`` from the next call on (e.g. only the decode steps after a prefill that
        recorded nothing); the plan and the request's prefill state stay."""
        taps.validate(self.shape)
        self.taps = taps
        self.recording.clear()

    def attend(self, module, query, key, value, attention_mask, scaling, dropout, kwargs):
        """Attention for one layer call: SDPA (or, where every head's statistics are recorded,
        the statistics op's own output), then the layer's softmax-stage edits on their heads,
        taps and output edits."""
        layer = module.layer_idx
        is_causal = bool(getattr(module, "is_causal", False))
        bias, redistribute = self.plan.for_layer(layer, "bias"), self.plan.for_layer(layer, "redistribute")
        output_stage = self.plan.for_layer(layer, "output")
        if bias or redistribute or output_stage:
            self._begin_call(layer, attention_mask, query, key, is_causal)
        out = self._record_stats(layer, module, query, key, value, attention_mask, scaling, dropout)
        if out is None:
            sdpa_mask = None if self._plain_mask(attention_mask, query, key, is_causal) else attention_mask
            out, _ = sdpa_attention_forward(
                module, query, key, value, sdpa_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        edited = None
        if bias or redistribute:
            heads, probs, head_out = editing.edited_attention(
                layer, bias, redistribute, self.state, query, key, value, attention_mask,
                _scaling(module, scaling, query), self.shape.group_size, is_causal,
            )
            out = out.clone()
            out[:, :, list(heads)] = head_out
            edited = (heads, probs)
        self._record_attention(layer, module, query, key, attention_mask, scaling, edited)
        out = self.apply_output_edits(layer, out, key.shape[-2])
        if layer in self.splice:
            replaced = self.splice[layer](out)
            if replaced.shape != out.shape:
                raise ValueError(f"splice of layer {layer} returned shape {tuple(replaced.shape)}, "
                                 f"expected {tuple(out.shape)}")
            out = replaced.to(out.dtype)
        if layer in self.taps.head_outputs:
            self.recording.head_outputs[layer].append(out.detach())
        return out, None

    def apply_output_edits(self, layer: int, out: torch.Tensor, n_key: int) -> torch.Tensor:
        """The plan's output-stage edits times the gates, on ``out [B, Nq, H, D]`` whose rows
        are the last ``Nq`` of ``n_key`` positions."""
        output_stage = self.plan.for_layer(layer, "output")
        if output_stage:
            rows = torch.arange(out.shape[1]) + n_key - out.shape[1]
            out = editing.output_edits(layer, output_stage, self.state, self.request, out, rows)
        if self.gates is not None:
            out = attention_math.scale_heads(out, self.gates[layer])
        return out

    def _begin_call(self, layer, attention_mask, query, key, is_causal) -> None:
        """At a prefill call (as many queries as keys) of a new request, reset the state (unless
        pinned) and fix the prompt's valid keys and spans."""
        n_query, n_key = query.shape[-2], key.shape[-2]
        if n_query == n_key and not self.state.pinned:
            if layer in self._prefilled_layers:  # a second prefill: a new request
                self.state = RequestState(pending_hidden=self.state.pending_hidden)
                self._prefilled_layers.clear()
            self._prefilled_layers.add(layer)
        if self.state.prompt_keys is None:
            if n_query != n_key:
                raise PlanError("edits need the prefill of a request before its decode steps")
            key_valid, _, _ = self._decomposed_mask(attention_mask, query, key, is_causal)
            batch = query.shape[0]
            self.state.prompt_keys = key_valid.cpu().clone()
            self.state.span = span_mask(self.request.span, batch, n_key, "span")
            self.state.emphasis = span_mask(self.request.emphasis, batch, n_key, "emphasis")

    def _record_attention(self, layer, module, query, key, attention_mask, scaling, edited=None) -> None:
        """Record the tapped heads' maps: the edited ``(heads, probs)`` where the plan changed
        them, else recomputed in fp32 beside SDPA."""
        heads = self.taps.attention_heads(layer, self.shape.n_heads)
        if heads is None:
            return
        if layer == min(self.taps.attention) or self.taps.attention_consumer is not None:
            self._map_bytes_this_call = 0
        batch, _, n_query, _ = query.shape
        nbytes = 4 * batch * len(heads) * n_query * key.shape[-2]
        self._map_bytes_this_call += nbytes
        if self._map_bytes_this_call > self.taps.map_budget_bytes:
            raise MapBudgetError(
                f"recording attention maps needs {self._map_bytes_this_call / 2**20:.0f} MiB in this call, over "
                f"the budget of {self.taps.map_budget_bytes / 2**20:.0f} MiB; tap fewer layers/heads, use "
                "shorter inputs, or raise Taps.map_budget_bytes"
            )
        probs = attention_math.attention_probs(
            query, key, attention_mask, _scaling(module, scaling, query), heads,
            module.num_key_value_groups if hasattr(module, "num_key_value_groups") else 1,
            bool(getattr(module, "is_causal", False)),
        )
        if edited is not None:
            edited_heads, edited_probs = edited
            for pos, head in enumerate(heads):
                if head in edited_heads:
                    probs[:, pos] = edited_probs[:, edited_heads.index(head)]
        self.recording.attention_heads[layer] = heads
        if self.taps.attention_consumer is not None:
            self.taps.attention_consumer(layer, probs.detach())
        else:
            self.recording.attention[layer].append(probs.detach())

    def _record_stats(self, layer, module, query, key, value, attention_mask, scaling, dropout):
        """Record row statistics of the tapped heads; return the layer output ``[B, N, H, D]``
        when the op computed it for every head (one attention pass instead of two), else None."""
        heads = self.taps.stats_heads(layer, self.shape.n_heads)
        if heads is None:
            return None
        is_causal = bool(getattr(module, "is_causal", False))
        key_valid, query_valid, q_offset = self._decomposed_mask(attention_mask, query, key, is_causal)
        all_heads = len(heads) == self.shape.n_heads
        if all_heads:
            q, k, v = query, key, value
        else:  # a subset of query heads: give each its own copy of its KV head
            kv = attention_math.kv_heads_for(heads, self.shape.group_size)
            q, k, v = query[:, list(heads)], key[:, kv], value[:, kv]
        stats = attention_with_stats(
            q, k, v, scale=_scaling(module, scaling, query), causal=is_causal, q_offset=q_offset,
            key_valid=key_valid, key_groups=self._key_groups(key.shape[-2]), topk=self.taps.stats_topk,
            columns=self.taps.stats_columns, query_valid=query_valid, backend=self.taps.stats_backend,
        )
        # the recording keeps the statistics, not the output (30 layers of outputs at 8192 tokens
        # would add ~0.6 GB to SmolLM2's peak memory)
        self.recording.stats[layer].append(dataclasses.replace(stats, out=None, columns=None))
        if stats.columns is not None:
            self.recording.columns[layer].append(stats.columns)
        if self.taps.stats_row_offsets:
            self.recording.row_keys[layer].append(row_key_probs(
                q, k, stats.lse, self.taps.stats_row_offsets, scale=_scaling(module, scaling, query),
                q_offset=q_offset, key_valid=key_valid,
            ))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if all_heads and not (dropout and module.training) and not needs_grad:  # the op is forward only
            return stats.out.transpose(1, 2)
        return None

    def _plain_mask(self, attention_mask, query, key, is_causal) -> bool:
        """True when the mask hides nothing but the causal future (or nothing) and SDPA can take
        ``None`` instead, as the untouched SDPA model does (its ``is_causal`` path, about twice as
        fast on the CPU as an explicit float mask): square prefill or a single decode row, no
        padding. Other shapes keep the explicit mask."""
        if attention_mask is None:
            return False
        n_query, n_key = query.shape[-2], key.shape[-2]
        if is_causal and not (n_query == n_key or n_query == 1):
            return False
        try:
            key_valid, _, _ = self._decomposed_mask(attention_mask, query, key, is_causal)
        except attention_math.MaskStructureError:
            return False
        return bool(key_valid.all())

    def _decomposed_mask(self, attention_mask, query, key, is_causal):
        """:func:`attention_math.decompose_mask` of this call's mask, computed once per forward
        (every layer receives the same mask tensor)."""
        signature = (attention_mask, tuple(query.shape), tuple(key.shape), is_causal)
        cached = self._mask_cache
        if cached is not None and cached[0][0] is attention_mask and cached[0][1:] == signature[1:]:
            return cached[1]
        key_valid, query_valid, q_offset = attention_math.decompose_mask(
            attention_mask, query.shape[-2], key.shape[-2], is_causal, query.device
        )
        result = (key_valid.expand(query.shape[0], -1), query_valid.expand(query.shape[0], -1), q_offset)
        self._mask_cache = (signature, result)
        return result

    def _key_groups(self, n_key: int) -> torch.Tensor | None:
        """The requested key groups, extended with False for keys added by decoding."""
        groups = self.taps.stats_key_groups
        if groups is None or groups.shape[-1] >= n_key:
            return None if groups is None else groups[..., :n_key]
        return torch.nn.functional.pad(groups, (0, n_key - groups.shape[-1]), value=False)


def _scaling(module, scaling, query) -> float:
    if scaling is not None:
        return scaling
    return getattr(module, "scaling", query.shape[-1] ** -0.5)


def headlab_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: ``(out [batch, query, heads, head_dim], None)``.

    Modules without an attached session (for example another model switched to ``"headlab"``
    by hand) get plain SDPA.
    """
    session: Session | None = getattr(module, _SESSION_ATTR, None)
    if session is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return session.attend(module, query, key, value, attention_mask, scaling, dropout, kwargs)


def register() -> None:
    """Register ``"headlab"`` with the attention interface and, bound to the eager (additive float)
    mask builder, with the mask interface; without the latter the mask would arrive as None."""
    AttentionInterface.register(HOOK_NAME, headlab_attention)
    AttentionMaskInterface.register(HOOK_NAME, eager_mask)


register()


def _refuse_converted_layers(modules, plan: Plan, taps: Taps, gates, splice) -> None:
    """Layers converted to linear attention never call the attention interface: an edit, tap,
    gate or splice there would be silently ignored, so it is refused."""
    converted = {m.layer_idx for m in modules if isinstance(m, LinearAttention)}
    if not converted:
        return
    touched = plan.layers() | set(taps.attention) | set(taps.stats) | set(taps.head_outputs) | set(splice or {})
    if gates is not None:
        touched |= converted
    clash = sorted(touched & converted)
    if clash:
        raise PlanError(f"layers {clash} are converted to linear attention, which the attention hook does not reach; "
                        "edit, record or gate softmax layers only")


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


def _implementation_snapshot(config) -> dict:
    """The attention implementation of a config and of each of its sub-configs, in the dict
    form ``set_attn_implementation`` accepts."""
    snap = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            snap[key] = _implementation_snapshot(sub)
    return snap


def _hooked_implementation(model) -> str | dict:
    """``"headlab"`` for a text model; for a multimodal model, ``"headlab"`` for the language
    model's sub-config only (vision towers keep theirs)."""
    text_cfg = text_config(model.config)
    if text_cfg is model.config:
        return HOOK_NAME
    for key in model.config.sub_configs:
        if getattr(model.config, key, None) is text_cfg:
            return {key: HOOK_NAME}
    raise PlanError(f"cannot find the language-model sub-config of {type(model).__name__}")


@contextmanager
def attach(
    model,
    plan: Plan | None = None,
    taps: Taps | None = None,
    gates: torch.Tensor | None = None,
    request: Request | None = None,
    splice: Mapping[int, Splice] | None = None,
) -> Iterator[Session]:
    """Run ``model`` through the headlab attention function inside the block.

    ``plan``: edits to apply; ``taps``: what to record (``session.recording``); ``gates``: an
    optional ``[n_layers, n_heads]`` tensor multiplying head outputs (may require grad, for
    gradient importance); ``request``: spans and references the edits read; ``splice``:
    layer -> function replacing that layer's per-head outputs ``[B, N, H, D]`` (after the
    plan's output edits, before ``o_proj`` and the head-output taps), e.g. a sparse
    autoencoder's reconstruction. The previous attention implementation is restored on exit.
    """
    require_attention_interface(model)
    shape = model_shape(model)
    plan = plan or Plan()
    taps = taps or Taps()
    plan.validate(shape)
    taps.validate(shape)
    if gates is not None and tuple(gates.shape) != (shape.n_layers, shape.n_heads):
        raise PlanError(f"gates must have shape {(shape.n_layers, shape.n_heads)}, got {tuple(gates.shape)}")
    modules = attention_modules(model)
    if any(hasattr(m, _SESSION_ATTR) for m in modules):
        raise RuntimeError("headlab is already attached to this model; nested attach() is not supported")
    previous = _implementation_snapshot(model.config)
    bad = [layer for layer in splice or {} if not 0 <= layer < shape.n_layers]
    if bad:
        raise PlanError(f"splice names layers {bad}, but the model has layers 0..{shape.n_layers - 1}")
    _refuse_converted_layers(modules, plan, taps, gates, splice)
    session = Session(shape, plan, taps, gates, request, splice)
    hooks = _residual_hooks(model, plan, session)
    try:
        for module in modules:
            setattr(module, _SESSION_ATTR, session)
        model.set_attn_implementation(_hooked_implementation(model))
        yield session
    finally:
        for hook in hooks:
            hook.remove()
        for module in modules:
            if hasattr(module, _SESSION_ATTR):
                delattr(module, _SESSION_ATTR)
        model.set_attn_implementation(previous)


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


def _residual_hooks(model, plan: Plan, session: Session) -> list:
    """Forward pre-hooks keeping the residual stream entering each layer with a VAR edit."""
    layers = sorted({e.layer for e in plan.edits if e.kind == "redistribute"})
    if not layers:
        return []
    blocks = decoder_layers(model)
    missing = [layer for layer in layers if layer not in blocks]
    if missing:
        raise PlanError(f"cannot find the decoder blocks of layers {missing} to read their residual stream")

    def keeper(layer):
        def hook(module, args, kwargs):
            session.state.pending_hidden[layer] = block_input(args, kwargs).detach()
        return hook

    return [blocks[layer].register_forward_pre_hook(keeper(layer), with_kwargs=True) for layer in layers]


def apply(model, plan: Plan, request: Request | None = None):
    """``with apply(model, plan, request):`` run ``model`` with the plan's edits (see :func:`attach`)."""
    return attach(model, plan, request=request)
