"""Trading time for memory in a backward pass: each decoder block's activations are recomputed in the
backward pass instead of kept from the forward (activation checkpointing), for long inputs whose kept
activations would not fit. On the CPU the recomputed forward is the same computation, so the gradients
are those of a plain backward pass."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch.utils.checkpoint import checkpoint

from .shape import model_shape, text_config
from .sites import decoder_layers, forwards_set

# Floats a decoder block keeps per token for its backward pass, in units of the model width: its norms'
# and projections' inputs, queries, keys, values and outputs, and the MLP's wider intermediates (SmolLM2:
# about 21; 8,192 tokens keep 12 GB over its 30 blocks).
KEPT_WIDTHS_PER_TOKEN = 20
RECOMPUTE_ABOVE_BYTES = 2 * 2**30


def kept_activation_bytes(model, n_tokens: int) -> int:
    """An estimate of the bytes ``model``'s blocks keep for the backward pass of ``n_tokens`` tokens."""
    shape = model_shape(model)
    width = text_config(model.config).hidden_size
    element = next(model.parameters()).element_size()
    return n_tokens * shape.n_layers * KEPT_WIDTHS_PER_TOKEN * width * element


def needs_recompute(model, n_tokens: int) -> bool:
    """Whether a backward pass over ``n_tokens`` tokens should recompute the blocks' activations:
    their estimate passes :data:`RECOMPUTE_ABOVE_BYTES`."""
    return kept_activation_bytes(model, n_tokens) > RECOMPUTE_ABOVE_BYTES


@contextmanager
def recomputed_in_backward(model) -> Iterator[None]:
    """Inside, every decoder block of ``model`` keeps only its inputs for the backward pass, which
    runs the block again (non-reentrant ``torch.utils.checkpoint``); the backward must run inside
    too, under whatever hooks the forward ran with. A forward set on a block itself before
    (accelerate's offloading wrapper) is wrapped, and put back on exit."""
    blocks = list(decoder_layers(model).values())
    with forwards_set(blocks, [_recomputing(block.forward) for block in blocks]):
        yield


def _recomputing(forward):
    def recomputing(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return recomputing


__all__ = ["RECOMPUTE_ABOVE_BYTES", "kept_activation_bytes", "needs_recompute", "recomputed_in_backward"]
