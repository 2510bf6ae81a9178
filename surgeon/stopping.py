"""Ending a forward pass early: after the last block whose attention is needed, the rest of the
model is wasted work for recording taps or collecting activations."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

from .sites import decoder_layers


class _StopForward(Exception):
    """Raised by the forward hook of the last needed block; caught by :func:`stop_after`."""


@contextmanager
def stop_after(model, layer: int) -> Iterator[None]:
    """Within the block, a forward of ``model`` ends right after decoder block ``layer`` (the
    call then returns ``None``; taps and hooks up to that block have run). Models whose blocks
    cannot be found (encoders without ``self_attn``) run to the end as usual."""
    block = decoder_layers(model).get(layer)
    if block is None:
        yield
        return

    def hook(module, args, output):
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


def run_until(model, layer: int, **inputs) -> None:
    """Run ``model(**inputs)`` up to and including decoder block ``layer``."""
    with stop_after(model, layer):
        model(**inputs)


def run_for_taps(model, **inputs):
    """``model(**inputs)`` for what its hooks and taps record: a causal LM computes logits for the
    last position only (at 4096 tokens, Gemma 3's 262k-word vocabulary would otherwise hold
    4.3 GB of logits nobody reads). Returns the model's output."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs.setdefault("logits_to_keep", 1)
    return model(**inputs)


__all__ = ["run_for_taps", "run_until", "stop_after"]
