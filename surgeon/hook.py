"""The attention functions headlab registers with transformers, and the context manager that installs them.

``attach(model, plan, taps)`` switches the model to ``"headlab-<base>"``, where ``<base>`` is the
attention implementation the model was using (``sdpa``, ``eager``, ...): the registered function
hands each call to the attach's session, and the mask builder registered under the same name is
the base's own, so every layer receives the mask it always received. A layer with nothing to do
calls the base implementation itself (for ``eager``, the modeling file's own
``eager_attention_forward``) with every keyword transformers passed (sliding window, soft-cap,
learned sinks, dropout, scaling): an empty plan reproduces the untouched model bit for bit. The
previous implementation is restored on exit, also after an exception.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Mapping

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..core.errors import UnsupportedModelError
from ..core.shape import ModelShape, model_shape, text_config
from . import attention_math
from .attention_math import AttentionCall
from .conversion.layer import LinearAttention
from .edits import stages
from .plan import Plan, PlanError
from .recorder import Recorder
from .request import Request, RequestState, section_masks, span_mask
from .sites import (
    attention_modules,
    block_input,
    decoder_layers,
    require_attention_interface,
)
from .streaming.mixing import StreamMix
from .taps import Recording, Taps

HOOK_NAME = "headlab"

Splice = Callable[[torch.Tensor], torch.Tensor]  # per-head outputs [B, N, H, D] -> replacement
_SESSION_ATTR = "_headlab_session"
_INSTALLED_ATTR, _INSTALLED_EXIT = "_headlab_installed_plan", "_headlab_installed_exit"


class Session:
    """Per-request state the attention function reads: the plan, gates, the request's inputs and
    what its prefill fixed (``state``); taps and the recording are its :class:`~.recorder.Recorder`'s."""

    def __init__(self, shape: ModelShape, plan: Plan, taps: Taps, gates: torch.Tensor | None,
                 request: Request | None = None, splice: Mapping[int, Splice] | None = None,
                 delegates: Mapping[int, Callable] | None = None, mixing: StreamMix | None = None,
                 converted: frozenset[int] = frozenset(), compression=None):
        self.shape = shape
        self.compression = compression  # a KVPress: its layers attend over what their compressed cache holds
        self.converted = converted  # layers converted to linear attention (the hook never reaches them)
        self.mixing = mixing
        self.splice = dict(splice or {})
        self.plan = plan
        self.gates = gates  # [n_layers, n_heads] multiplier on head outputs (may require grad)
        self.request = request or Request()
        self.state = RequestState()
        self.recorder = Recorder(shape, taps)
        self.delegates = dict(delegates or {})  # layer -> the model's own attention function
        self._prefilled_layers: set[int] = set()
        self._seen: dict[int, int] = {}  # layer -> tokens of the current sequence so far

    @property
    def recording(self) -> Recording:
        """What the taps recorded."""
        return self.recorder.recording

    @property
    def taps(self) -> Taps:
        return self.recorder.taps

    def set_taps(self, taps: Taps) -> None:
        """Record ``taps`` from the next call on (e.g. only the decode steps after a prefill that
        recorded nothing); the plan and the request's prefill state stay."""
        _refuse_converted_layers(self.converted, Plan(), taps, None, None, None)
        self.recorder.set_taps(taps)

    def resume(self, n_cached: int) -> None:
        """The next call extends a cache of ``n_cached`` positions that was filled outside this
        session (e.g. one unedited prefill shared by plans that edit only later calls), so that
        every layer knows where its keys sit. Edits that read the prompt still need the prefill."""
        if n_cached < 1:
            raise ValueError(f"a resumed cache holds at least one position, not {n_cached}")
        self._seen = {layer: n_cached for layer in range(self.shape.n_layers)}

    def continue_request(self, state: RequestState, n_cached: int) -> None:
        """The next calls continue a request whose prefill ran elsewhere: ``state`` is what it fixed
        (pinned here, so a later prefill keeps it) and ``n_cached`` the positions it left in the cache
        (0: the next call is a prefill, which keeps ``state`` instead of fixing its own)."""
        state.pin()
        self.state = state
        self._prefilled_layers.clear()
        if n_cached:
            self.resume(n_cached)
        else:
            self._seen.clear()

    def attend(self, module, query, key, value, attention_mask, kwargs):
        """Attention for one layer call: the model's own (or, where every head's statistics are
        recorded, the statistics op's output), then the layer's softmax-stage edits on their
        heads, taps and output edits. Edits that only hide keys (:meth:`~.edits.base.Edit.kept_keys`) narrow
        the mask of the model's own attention instead, where no tap reads the layer's scores.
        Returns ``(out [B, Nq, H, D], weights or None)``."""
        layer = module.layer_idx
        n_query, n_key = query.shape[-2], key.shape[-2]
        key_start = self._key_start(layer, n_query, n_key)
        own = self.delegates[layer]
        if self.compression is not None and layer in self.compression.layers:
            return self.compression.attend(module, own, query, key, value, attention_mask, kwargs)
        if not self._touches(layer):
            return own(module, query, key, value, attention_mask, **kwargs)
        prefill = n_query == n_key and not key_start
        bias, reweight = (self.plan.for_layer(layer, stage, prefill) for stage in ("bias", "reweight"))
        if layer in self.plan.layers():
            self._begin_request(layer, n_query, n_key)
        call = None
        if bias or reweight or self.recorder.reads_scores(layer):
            call = AttentionCall.read(module, query, kwargs, key_start)
        if any(edit.needs_prompt for edit in (*bias, *reweight)):
            self._fix_prompt(attention_mask, query, key, call)
        kept = None if reweight or self.recorder.reads_scores(layer) else stages.kept_keys(
            layer, bias, self.state, self.request, call, n_query, n_key)
        weights = None
        self.recorder.stats(layer, query, key, value, attention_mask, call)
        if kept is not None:  # the edits only hide keys: the model's own attention on what each head keeps
            bias = []
            out = self._kept_attention(module, own, query, key, value, attention_mask, kwargs, call, kept)
        else:
            out, weights = own(module, query, key, value, attention_mask, **kwargs)
        edited = None
        if bias or reweight:
            heads, probs, head_out = stages.edited_attention(
                layer, bias, reweight, self.state, self.request, query, key, value, attention_mask, call,
                query.shape[1] // key.shape[1],
            )
            out = out.clone()
            out[:, :, list(heads)] = head_out
            edited, weights = (heads, probs), None
        self.recorder.attention(layer, query, key, attention_mask, call, edited)
        if self.mixing is not None and layer in self.mixing.layers:
            call = call or AttentionCall.read(module, query, kwargs, key_start)
            key_valid, _, _ = self.recorder.decomposed_mask(attention_mask, query, key, call)
            out = self.mixing.mix(layer, own, module, query, key, value, attention_mask, kwargs, out, key_valid,
                                  self.shape.group_size)
        out = self.apply_output_edits(layer, out, torch.arange(n_query) + key_start + n_key - n_query)
        if layer in self.splice:
            replaced = self.splice[layer](out)
            if replaced.shape != out.shape:
                raise ValueError(f"splice of layer {layer} returned shape {tuple(replaced.shape)}, "
                                 f"expected {tuple(out.shape)}")
            out = replaced.to(out.dtype)
        self.recorder.head_output(layer, out)
        return out, weights

    def _kept_attention(self, module, own, query, key, value, attention_mask, kwargs, call, kept) -> torch.Tensor:
        """Blocked over each edit's kept keys; a module with learned sinks (per-head parameters of the
        attention function) runs once under the narrowed mask instead."""
        if getattr(module, "sinks", None) is None:
            return stages.attention_with_kept_keys(own, module, query, key, value, attention_mask, kwargs, call,
                                                    kept, self.shape.group_size)
        narrowed = attention_math.narrowed_mask(attention_mask, stages.kept_mask(kept, query.shape[1]),
                                                query.shape[-2], key.shape[-2], call.is_causal, call.window)
        return own(module, query, key, value, narrowed, **kwargs)[0]

    def apply_output_edits(self, layer: int, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The plan's output-stage edits times the gates, on ``out [B, Nq, H, D]`` whose rows sit at
        sequence positions ``rows [Nq]``. Needs no mask."""
        output_stage = self.plan.for_layer(layer, "output")
        if output_stage:
            out = stages.output_edits(layer, output_stage, self.state, self.request, out, rows)
        if self.gates is not None:
            out = attention_math.scale_heads(out, self.gates[layer])
        return out

    def _touches(self, layer: int) -> bool:
        """Whether this session edits, gates, splices or records anything on ``layer``."""
        return (self.gates is not None or layer in self.plan.layers() or layer in self.splice
                or layer in self.taps.head_outputs or self.recorder.reads_scores(layer)
                or (self.mixing is not None and layer in self.mixing.layers))

    def _key_start(self, layer: int, n_query: int, n_key: int) -> int:
        """Sequence position of this call's first key. A call with as many queries as keys starts
        a sequence; later calls add their rows to it, and a sliding-window cache hands over only
        the last keys. Tracked on every call of every layer, so it is known when needed."""
        seen = n_key if n_query == n_key else self._seen.get(layer, n_key - n_query) + n_query
        self._seen[layer] = seen
        return seen - n_key

    def _begin_request(self, layer: int, n_query: int, n_key: int) -> None:
        """At a prefill call (as many queries as keys) of a new request, reset the state (unless
        pinned) and note the prompt length."""
        if n_query != n_key:
            return
        if not self.state.pinned:
            if layer in self._prefilled_layers:  # a second prefill: a new request
                self.state = RequestState(residual=self.state.residual)
                self._prefilled_layers.clear()
            self._prefilled_layers.add(layer)
        if self.state.n_prompt is None:
            self.state.n_prompt = n_key

    def _fix_prompt(self, attention_mask, query, key, call: AttentionCall) -> None:
        """Once per request, from a prefill call: the prompt's valid keys and the request's spans
        (softmax-stage edits read them)."""
        if self.state.prompt_keys is not None:
            return
        if query.shape[-2] != key.shape[-2] or call.key_start:
            raise PlanError("edits need the prefill of a request before its decode steps")
        key_valid, _, _ = self.recorder.decomposed_mask(attention_mask, query, key, call)
        batch, n_key = query.shape[0], key.shape[-2]
        self.state.prompt_keys = key_valid.cpu().clone()
        self.state.span = span_mask(self.request.span, batch, n_key, "span")
        self.state.emphasis = section_masks(self.request.emphasis, batch, n_key, "emphasis")

def own_attention(base: str, module) -> Callable:
    """The attention function ``module`` runs under the implementation ``base``: the registered
    one, or for ``eager`` the ``eager_attention_forward`` of the module's modeling file."""
    if base == "eager":
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no eager_attention_forward in its modeling "
                                        "file, so headlab cannot reproduce its eager attention")
        return function
    if base not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise UnsupportedModelError(f"attention implementation {base!r} is not registered with transformers")
    return ALL_ATTENTION_FUNCTIONS[base]


def hook_name(base: str) -> str:
    """The implementation name headlab registers over ``base`` (``"headlab-sdpa"``, ...)."""
    return f"{HOOK_NAME}-{base}"


def _headlab_attention(base: str) -> Callable:
    def headlab_attention(module, query, key, value, attention_mask, **kwargs):
        """The registered attention function: ``(out [batch, query, heads, head_dim], weights or None)``.
        Modules without an attached session (another model switched to this name by hand) get
        the base implementation."""
        session: Session | None = getattr(module, _SESSION_ATTR, None)
        if session is None:
            return own_attention(base, module)(module, query, key, value, attention_mask, **kwargs)
        return session.attend(module, query, key, value, attention_mask, kwargs)

    return headlab_attention


def register(base: str) -> str:
    """Register ``hook_name(base)`` with the attention interface and, with ``base``'s own mask
    builder, with the mask interface (a base without one gets none either: transformers then passes
    no mask, as it does to the base). Returns the name."""
    name = hook_name(base)
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _headlab_attention(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _refuse_converted_layers(converted: frozenset[int], plan: Plan, taps: Taps, gates, splice,
                             mixing: StreamMix | None) -> None:
    """Layers converted to linear attention never call the attention interface: an edit, gate,
    splice, statistics or head-output tap there would be silently ignored, so it is refused (their
    attention maps come from the converted form: :func:`_converted_map_hooks`)."""
    if not converted:
        return
    touched = plan.layers() | set(taps.stats) | set(taps.head_outputs) | set(splice or {})
    touched |= set(mixing.layers) if mixing is not None else set()
    if gates is not None:
        touched |= converted
    clash = sorted(touched & converted)
    if clash:
        raise PlanError(f"layers {clash} are converted to linear attention, which the attention hook does not reach; "
                        "edit, gate, splice or record statistics and head outputs of softmax layers only")


def _refuse_shared_layers(compression, plan: Plan, taps: Taps, gates, splice, mixing: StreamMix | None,
                          shape: ModelShape) -> None:
    """A press's layers attend over what its cache holds, which edits, gates, splices, mixing and
    taps do not model: any of them on those layers is refused."""
    if compression is None:
        return
    touched = plan.layers() | set(taps.stats) | set(taps.head_outputs) | set(splice or {})
    touched |= set(mixing.layers) if mixing is not None else set()
    if gates is not None:
        touched |= set(range(shape.n_layers))
    clash = sorted(touched & set(compression.layers))
    if clash:
        raise PlanError(f"layers {clash} are compressed by the press; edit, gate, splice, mix or record other layers "
                        "only")


def _implementation_snapshot(config) -> dict:
    """The attention implementation of a config and of each of its sub-configs, in the dict
    form ``set_attn_implementation`` accepts."""
    snap = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            snap[key] = _implementation_snapshot(sub)
    return snap


def _hooked_implementation(model, name: str) -> str | dict:
    """``name`` for a text model; for a multimodal model, ``name`` for the language model's
    sub-config only (vision towers keep theirs)."""
    text_cfg = text_config(model.config)
    if text_cfg is model.config:
        return name
    for key in model.config.sub_configs:
        if getattr(model.config, key, None) is text_cfg:
            return {key: name}
    raise PlanError(f"cannot find the language-model sub-config of {type(model).__name__}")


@contextmanager
def attach(
    model,
    plan: Plan | None = None,
    taps: Taps | None = None,
    gates: torch.Tensor | None = None,
    request: Request | None = None,
    splice: Mapping[int, Splice] | None = None,
    mixing: StreamMix | None = None,
    compression=None,
) -> Iterator[Session]:
    """Run ``model`` through the headlab attention function inside the block.

    ``plan``: edits to apply; ``taps``: what to record (``session.recording``); ``gates``: an
    optional ``[n_layers, n_heads]`` tensor multiplying head outputs (may require grad, for
    gradient importance); ``request``: spans and references the edits read; ``splice``:
    layer -> function replacing that layer's per-head outputs ``[B, N, H, D]`` (after the
    plan's output edits, before ``o_proj`` and the head-output taps), e.g. a sparse
    autoencoder's reconstruction; ``mixing``: DuoAttention's gates (:class:`~.streaming.mixing.StreamMix`),
    applied before the output edits; ``compression``: a :class:`~.compression.press.KVPress`, whose
    global layers then attend over what its cache holds (no edit, gate, tap or splice may share those
    layers). The previous attention implementation is restored on exit.
    Layers the session leaves alone run the model's own implementation, unchanged.
    """
    installed = getattr(model, _INSTALLED_ATTR, None)
    if installed is not None:  # the model's own plan runs first, then this one
        uninstall(model)
        try:
            with attach(model, installed.then(plan), taps, gates, request, splice, mixing, compression) as session:
                yield session
        finally:
            install(model, installed)
        return
    require_attention_interface(model)
    shape = model_shape(model)
    plan = plan or Plan()
    taps = taps or Taps()
    plan.validate(shape)
    for edit in plan.edits:
        if edit.needs_residual:
            edit.validate_residual(text_config(model.config).hidden_size)
    taps.validate(shape)
    if gates is not None and tuple(gates.shape) != (shape.n_layers, shape.n_heads):
        raise PlanError(f"gates must have shape {(shape.n_layers, shape.n_heads)}, got {tuple(gates.shape)}")
    if gates is not None and not torch.isfinite(gates).all():
        raise PlanError("gates hold values that are not finite (NaN or infinity)")
    modules = attention_modules(model)
    if any(hasattr(m, _SESSION_ATTR) for m in modules):
        raise RuntimeError("headlab is already attached to this model; nested attach() is not supported")
    previous = _implementation_snapshot(model.config)
    bad = [layer for layer in splice or {} if not 0 <= layer < shape.n_layers]
    if bad:
        raise PlanError(f"splice names layers {bad}, but the model has layers 0..{shape.n_layers - 1}")
    converted = frozenset(m.layer_idx for m in modules if isinstance(m, LinearAttention))
    _refuse_converted_layers(converted, plan, taps, gates, splice, mixing)
    _refuse_shared_layers(compression, plan, taps, gates, splice, mixing, shape)
    base = text_config(model.config)._attn_implementation
    delegates = {m.layer_idx: own_attention(base, m) for m in modules if not isinstance(m, LinearAttention)}
    name = register(base)
    if mixing is not None and tuple(mixing.alphas.shape) != (shape.n_layers, shape.n_kv_heads):
        raise PlanError(f"gate mixing needs alphas of shape {(shape.n_layers, shape.n_kv_heads)}, "
                        f"got {tuple(mixing.alphas.shape)}")
    if mixing is not None and not torch.isfinite(mixing.alphas).all():
        raise PlanError("gate mixing's alphas hold values that are not finite (NaN or infinity)")
    session = Session(shape, plan, taps, gates, request, splice, delegates, mixing, converted, compression)
    hooks = _residual_hooks(model, plan, session) + _converted_map_hooks(modules, session)
    try:
        for module in modules:
            setattr(module, _SESSION_ATTR, session)
        model.set_attn_implementation(_hooked_implementation(model, name))
        yield session
    finally:
        for hook in hooks:
            hook.remove()
        for module in modules:
            if hasattr(module, _SESSION_ATTR):
                delattr(module, _SESSION_ATTR)
        model.set_attn_implementation(previous)


def install(model, plan: Plan) -> None:
    """Make ``plan`` the model's own: every forward runs its edits from now on, outside
    :func:`attach` too, and an :func:`attach` runs its own plan after it (how an edited checkpoint
    whose edits cannot fold into the weights reloads; :func:`uninstall` takes it off)."""
    if getattr(model, _INSTALLED_ATTR, None) is not None:
        raise PlanError("this model has a plan installed already; uninstall(model) first, or attach() the new edits")
    stack = ExitStack()
    stack.enter_context(attach(model, plan))
    setattr(model, _INSTALLED_ATTR, plan)
    setattr(model, _INSTALLED_EXIT, stack)


def installed_plan(model) -> Plan | None:
    """The plan :func:`install` made the model's own, or None."""
    return getattr(model, _INSTALLED_ATTR, None)


def uninstall(model) -> Plan | None:
    """Take the installed plan off the model (it then runs unedited); returns it, or None."""
    plan = getattr(model, _INSTALLED_ATTR, None)
    if plan is not None:
        getattr(model, _INSTALLED_EXIT).close()
        delattr(model, _INSTALLED_ATTR)
        delattr(model, _INSTALLED_EXIT)
    return plan


def _residual_hooks(model, plan: Plan, session: Session) -> list:
    """Forward pre-hooks keeping the residual stream entering each layer with an edit that needs it."""
    layers = sorted({e.layer for e in plan.edits if e.needs_residual})
    if not layers:
        return []
    blocks = decoder_layers(model)
    missing = [layer for layer in layers if layer not in blocks]
    if missing:
        raise PlanError(f"cannot find the decoder blocks of layers {missing} to read their residual stream")

    def keeper(layer):
        def hook(module, args, kwargs):
            session.state.residual[layer] = block_input(args, kwargs).detach()
        return hook

    return [blocks[layer].register_forward_pre_hook(keeper(layer), with_kwargs=True) for layer in layers]


def _converted_map_hooks(modules, session: Session) -> list:
    """Forward pre-hooks recording the tapped maps of layers converted to linear attention from
    their converted form (:meth:`~.conversion.layer.LinearAttention.attention_weights_of`, dense:
    whole inputs only; a call continuing a cache is refused, its input alone does not give them)."""
    def record(module, args, kwargs):
        layer = module.layer_idx
        if layer not in session.taps.attention:
            return
        past = kwargs.get("past_key_values")
        if past is not None and layer < len(past.layers) and past.layers[layer].get_seq_length() > 0:
            raise PlanError(f"layer {layer} is converted to linear attention: its maps are recorded on whole "
                            "inputs, not on calls that continue a cache")
        hidden = block_input(args, kwargs)  # [B, N, d_model]
        size = (hidden.shape[0], hidden.shape[1], hidden.shape[1])
        session.recorder.made_pattern(
            layer, size, lambda: module.attention_weights_of(hidden, kwargs.get("position_embeddings")))

    return [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules if isinstance(m, LinearAttention)]
