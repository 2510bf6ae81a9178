"""The next-token loss of a long input in chunks of logits equals the model's own loss and gradients,
through the model's own head (soft-capping included), with each chunk's logits made again in the
backward pass."""

import copy

import pytest
import torch
from families import family_model

import headlab.surgeon.losses as recompute
from headlab.surgeon import attach, model_shape

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the head soft-caps its logits at 30
def test_a_loss_in_chunks_of_logits_is_the_models_loss_and_gradient(family, monkeypatch):
    model = family_model(family)
    ids = torch.randint(3, 90, (1, 21), generator=torch.Generator().manual_seed(0))
    shape, vocab = model_shape(model), model.get_output_embeddings().weight.shape[0]

    def loss_and_gates_gradient():
        gates = torch.ones(shape.n_layers, shape.n_heads, requires_grad=True)
        with attach(model, gates=gates):
            loss = recompute.next_token_loss(model, ids)
            (gradient,) = torch.autograd.grad(loss, gates)
        return loss.detach(), gradient

    whole, whole_gradient = loss_and_gates_gradient()
    assert torch.equal(whole, model(input_ids=ids, labels=ids).loss.detach())  # the model's own below the budget
    monkeypatch.setattr(recompute, "LOGITS_ABOVE_BYTES", 0)
    monkeypatch.setattr(recompute, "LOGITS_CHUNK_BYTES", 6 * vocab * 4)  # 20 positions: chunks of 6, 6, 6, 2
    made = []
    head = model.get_output_embeddings()
    head.forward = lambda x, own=head.forward: (made.append(x.shape[1]), own(x))[1]  # a recompute runs no hooks
    try:
        chunked, chunked_gradient = loss_and_gates_gradient()
    finally:
        del head.forward  # the shared tiny model as it was
    # each chunk's logits once in the forward, once again in the backward (the last chunk holds row 20 too)
    assert made[:4] == [6, 6, 6, 3] and sorted(made[4:]) == [3, 6, 6, 6]
    # two fp32 means of the same 20 terms, summed in other orders: (n - 1)·eps of the terms, twice
    bound = 2 * 19 * EPS
    assert abs(chunked - whole) <= bound * whole
    assert (chunked_gradient - whole_gradient).abs().max() <= bound * whole_gradient.abs().max()
    assert not torch.equal(whole_gradient, torch.zeros_like(whole_gradient))


def test_a_model_whose_forward_skips_its_decoder_is_refused_not_scored_wrongly(monkeypatch):
    from headlab.core.errors import UnsupportedModelError

    model = family_model("llama")
    unused = copy.deepcopy(model.model)  # a decoder of the same shape that the model's forward never runs
    monkeypatch.setattr(model, "get_decoder", lambda: unused)
    monkeypatch.setattr(recompute, "LOGITS_ABOVE_BYTES", 0)
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(1))
    with pytest.raises(UnsupportedModelError, match="does not run its decoder"):
        recompute.next_token_loss(model, ids)
