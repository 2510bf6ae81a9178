"""Next-token losses of a language model, and trading time for memory in their backward pass over long
inputs: each decoder block's activations are
recomputed in the backward pass instead of kept from the forward (activation checkpointing; on the CPU
the recomputed forward is the same computation, so the gradients are those of a plain backward pass),
and :func:`next_token_loss` computes the logits of a long input in chunks, each recomputed in the
backward pass (a large vocabulary's logits over the whole input would not fit: Gemma 3's at 8,192
tokens take 8.6 GB in fp32, held several times over in the backward pass). :func:`heldout_loss` is the
mean loss over held-out windows (its exponential the perplexity)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..core.errors import UnsupportedModelError
from ..core import resources
from ..core.resources import LOGITS_ABOVE_BYTES, LOGITS_CHUNK_BYTES, RECOMPUTE_ABOVE_BYTES
from .sites import announcing_layers, decoder_layers, forwards_set

def kept_activation_bytes(model, n_tokens: int) -> int:
    """An estimate of the bytes ``model``'s blocks keep for the backward pass of ``n_tokens`` tokens
    (:func:`headlab.core.resources.kept_activation_bytes`, the estimate commands check before work)."""
    from .models import model_size

    element = next(model.parameters()).element_size()
    return resources.kept_activation_bytes(model_size(model.config, count=False), n_tokens, element)


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


def next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy of a causal language model on ``ids [1, N]``.

    The model's own loss where the fp32 logits of the whole input take at most
    :data:`LOGITS_ABOVE_BYTES` (the backward pass holds them several times over). Beyond, the same
    mean (other sums: equal within fp32 rounding) from the final hidden states in chunks of
    :data:`LOGITS_CHUNK_BYTES` of logits, each chunk's logits made by the model's own head (its
    soft-capping or scaling included) and made again in the backward pass."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if ids.shape[1] * vocab * 4 <= LOGITS_ABOVE_BYTES:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    decoder = model.get_decoder()
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [1, N, width]
    rows = max(1, LOGITS_CHUNK_BYTES // (vocab * 4))
    total = sum(checkpoint(_chunk_loss, model, decoder, hidden[:, start:start + rows],
                           ids[0, start + 1:start + rows + 1], use_reentrant=False)
                for start in range(0, ids.shape[1] - 1, rows))
    return total / (ids.shape[1] - 1)


def next_token_kl(target_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(target ‖ model)`` of next-token distributions averaged over positions: ``target_log_probs``
    and ``logits`` both ``[..., T, V]``."""
    got = torch.log_softmax(logits.float(), -1)
    return (target_log_probs.exp() * (target_log_probs - got)).sum(-1).mean()


@torch.no_grad()
def heldout_loss(model, windows: list[torch.Tensor], progress: bool = False, desc: str = "held-out loss") -> float:
    """Mean next-token cross-entropy (nats) over ``windows`` (each ``[1, seq]``); its exponential
    is the perplexity. ``progress``: a bar over the windows, titled ``desc``, its postfix the block each
    window's forward has reached."""
    if not windows:
        raise ValueError("no windows to evaluate")
    bar = tqdm(windows, desc=desc, unit="window", leave=False, disable=not progress)
    with announcing_layers(model, bar.set_postfix_str if progress else None):
        return sum(model(input_ids=ids, labels=ids, use_cache=False).loss.item() for ids in bar) / len(windows)


def _chunk_loss(model, decoder, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``targets [n]`` from the model's logits of ``hidden [1, m >= n, width]``,
    through the model's own forward with its decoder answering ``hidden``."""
    answered = []

    def answer(*args, **kwargs):
        answered.append(True)
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    with forwards_set([decoder], [answer]):
        logits = model(input_ids=targets[None], use_cache=False).logits[0, :len(targets)]
    if not answered:
        raise UnsupportedModelError(f"{type(model).__name__} does not run its decoder (get_decoder()) in its forward, "
                                    "so its loss cannot be taken in chunks of logits")
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _recomputing(forward):
    def recomputing(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return recomputing


__all__ = ["LOGITS_ABOVE_BYTES", "LOGITS_CHUNK_BYTES", "RECOMPUTE_ABOVE_BYTES", "heldout_loss", "kept_activation_bytes",
           "needs_recompute", "next_token_kl", "next_token_loss", "recomputed_in_backward"]
