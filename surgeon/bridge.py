"""Applying a plan and taps to a TransformerLens ``TransformerBridge``.

The bridge re-implements attention step by step (forced eager, its own softmax) so that its
``hook_attn_scores``/``hook_pattern`` fire; it never calls transformers' attention interface,
so the registered ``"headlab-*"`` functions do not run inside it. ``attach_bridge`` therefore
applies the same :class:`Session` logic through the bridge's own hook points:
``blocks.{l}.attn.hook_pattern`` (``[batch, heads, query, key]``, for attention taps) and
``blocks.{l}.attn.hook_z`` (``[batch, seq, heads, head_dim]``, for output edits and head-output
taps). Edits that change the softmax itself are not supported here yet and raise.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..core.shape import model_shape
from .hook import Session
from .plan import Plan, PlanError
from .taps import Taps


@contextmanager
def attach_bridge(
    bridge, plan: Plan | None = None, taps: Taps | None = None, gates: torch.Tensor | None = None
) -> Iterator[Session]:
    """Apply ``plan``/``taps``/``gates`` to a ``TransformerBridge`` inside the block (same
    semantics as :func:`headlab.surgeon.attach` on the wrapped HF model)."""
    shape = model_shape(bridge.original_model)
    plan = plan or Plan()
    taps = taps or Taps()
    plan.validate(shape)
    taps.validate(shape)
    unsupported = [e for e in plan.edits if not e.on_bridge]
    if unsupported:
        raise PlanError(
            f"attach_bridge runs edits of head outputs only; {unsupported[0].kind} needs the softmax or "
            "per-request state, which the bridge computes in its own code: apply it with attach() on the HF model"
        )
    session = Session(shape, plan, taps, gates)
    hooks = []
    for layer in range(shape.n_layers):
        if taps.attention_heads(layer, shape.n_heads) is not None:
            hooks.append((f"blocks.{layer}.attn.hook_pattern", _pattern_tap(session, layer)))
        hooks.append((f"blocks.{layer}.attn.hook_z", _z_hook(session, layer)))
    with bridge.hooks(fwd_hooks=hooks):
        yield session


def _pattern_tap(session: Session, layer: int):
    def tap(pattern, hook):
        session.recorder.pattern(layer, pattern)
        return pattern

    return tap


def _z_hook(session: Session, layer: int):
    def edit(z, hook):
        z = session.apply_output_edits(layer, z, torch.arange(z.shape[1]))
        session.recorder.head_output(layer, z)
        return z

    return edit
