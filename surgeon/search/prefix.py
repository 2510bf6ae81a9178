"""Running a causal model from the residual stream entering one layer.

An edit on layer ``l`` changes nothing before ``l``, so a search over the heads of ``l`` needs the
layers below it once per input, not once per head. :class:`LayerPrefix` keeps, for a fixed list of
input batches, the residual stream entering the current layer (computed by the unedited model,
layer after layer, so the layers below every candidate run once in all) and runs the model from
there: the blocks below the layer hand the kept stream through instead of computing it. The
blocks from the layer on receive the same tensors and keywords as in a full forward, so the
result is the full forward's, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ...core.errors import UnsupportedModelError
from ..sites import block_input, decoder_layers, forwards_set
from .accuracy import ChoiceBatch, model_forward


class Reached(Exception):
    """Raised by the pre-hook of the layer whose input is wanted: the rest of the forward is not needed."""


class LayerPrefix:
    """The residual stream ``[B, N, d_model]`` entering :attr:`layer` for each of ``batches``."""

    def __init__(self, model, batches: list[ChoiceBatch]):
        blocks = decoder_layers(model)
        if sorted(blocks) != list(range(len(blocks))) or not blocks:
            raise UnsupportedModelError(f"cannot find the decoder blocks of {type(model).__name__} in order")
        self.model = model
        self.batches = batches
        self.blocks = [blocks[i] for i in range(len(blocks))]
        self.layer = 0
        self.states: list[torch.Tensor] | None = None  # None at layer 0: the model's own embeddings
        self.known: dict[int, list[torch.Tensor]] = {}  # layer -> the stream entering it, computed elsewhere
        self._plain = model_forward(model)

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        """Make :attr:`states` the stream entering ``layer``: from :attr:`known` if there, else from
        the kept layer when ``layer`` is at or above it, else from the embeddings."""
        if layer == self.layer:
            return
        if layer in self.known:
            self.layer, self.states = layer, self.known[layer]
            return
        if layer < self.layer:
            self.layer, self.states = 0, None
        if layer == 0:
            return
        captured: list[torch.Tensor] = []

        def keep(module, args, kwargs):
            captured.append(block_input(args, kwargs))
            raise Reached

        handle = self.blocks[layer].register_forward_pre_hook(keep, with_kwargs=True)
        check = self.blocks[layer - 1].register_forward_hook(require_tensor_output)
        try:
            for index, batch in enumerate(self.batches):
                try:
                    self.forward(index, batch)
                except Reached:
                    pass
        finally:
            handle.remove()
            check.remove()
        self.layer, self.states = layer, captured

    def forward(self, index: int, batch: ChoiceBatch) -> torch.Tensor:
        """Logits at ``batch.read`` (see :func:`~.accuracy.model_forward`), with the blocks below
        :attr:`layer` handing through the kept stream of batch ``index``."""
        if self.states is None:
            return self._plain(index, batch)
        with handing_through(self.blocks[: self.layer], self.states[index]):
            return self._plain(index, batch)


def require_tensor_output(module, args, output) -> None:
    """A forward hook refusing a block that returns more than the residual stream."""
    if not isinstance(output, torch.Tensor):
        raise UnsupportedModelError(f"{type(module).__name__} returns {type(output).__name__}, not the residual "
                                    "stream alone, so its layers cannot be skipped")


@contextmanager
def handing_through(blocks: list[torch.nn.Module], states: torch.Tensor) -> Iterator[None]:
    """Inside, the first of ``blocks`` returns a copy of ``states`` (a later block may write into its
    input) and the others return their input. A forward set on a block itself before (accelerate's
    offloading wrapper, which loads the block's weights) is put back on exit."""

    def first(hidden_states, *args, **kwargs):
        return states.clone()

    def others(hidden_states, *args, **kwargs):
        return hidden_states

    with forwards_set(blocks, [first if i == 0 else others for i in range(len(blocks))]):
        yield
