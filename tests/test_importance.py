"""Importance and repeated-token scores on tiny models, with answers known by construction."""

import pytest
import torch
from conftest import eager_maps, tiny_llama

from headlab.probes.scorers.importance import (ablation_importance, gradient_importance, repeated_token_scores,
                                               repeated_tokens)

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

DEAD = (1, 2)  # (layer, head) whose o_proj input columns are zeroed: it cannot matter


def model_with_a_dead_head():
    model = tiny_llama("gqa")
    layer, head = DEAD
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight[:, head * 6 : (head + 1) * 6] = 0.0
    return model


def windows():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, 97, (1, 16), generator=gen) for _ in range(3)]


def test_gradient_importance_matches_o_proj_gates_and_is_zero_for_a_dead_head():
    model = model_with_a_dead_head()
    score = gradient_importance(model, windows())
    assert score[DEAD] == 0.0 and score.max() == 1.0
    # an independent route: a leaf ξ multiplying each head's slice of the o_proj input
    xi = torch.ones(3, 9, requires_grad=True)
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, args, idx=idx: (args[0] * xi[idx].repeat_interleave(6),)) for idx, layer in enumerate(model.model.layers)]
    total = torch.zeros(3, 9, dtype=torch.float64)
    for ids in windows():
        (grad,) = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, xi)
        total += grad.abs().double() * (ids.shape[1] - 1)
    for h in hooks:
        h.remove()
    ref = total / (total.norm(dim=1, keepdim=True) + 1e-20)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert torch.allclose(score.double(), ref, atol=1e-5)


def test_long_windows_recompute_each_block_in_the_backward_pass_and_get_the_same_gradients(monkeypatch):
    import headlab.probes.scorers.importance as importance

    model = model_with_a_dead_head()
    plain = gradient_importance(model, windows())
    calls = []
    for index, layer in enumerate(model.model.layers):  # counted in the forward itself: a recompute runs no hooks
        layer.mlp.forward = lambda *args, own=layer.mlp.forward, index=index: (calls.append(index), own(*args))[1]
    monkeypatch.setattr(importance, "needs_recompute", lambda model, n_tokens: True)  # as for a long window
    recomputed = gradient_importance(model, windows())
    assert sorted(calls) == sorted([0, 1, 2] * 2 * 3)  # each block twice per window: forward, then backward
    assert torch.equal(recomputed, plain)
    assert "forward" not in model.model.layers[0].__dict__  # the blocks' own forward is back


def test_recomputed_blocks_put_back_a_forward_set_on_a_block_before():
    from headlab.surgeon.losses import recomputed_in_backward

    model = tiny_llama("gqa")
    block = model.model.layers[1]
    wrapper = block.forward  # as accelerate's offloading wrapper is set on the block itself
    block.forward = wrapper
    ids = windows()[0]
    with recomputed_in_backward(model):
        assert block.forward is not wrapper
        model(input_ids=ids, labels=ids).loss.backward()
    assert block.__dict__["forward"] is wrapper and "forward" not in model.model.layers[0].__dict__


def test_ablation_importance_is_the_loss_change_of_zeroing_the_heads_columns():
    model = model_with_a_dead_head()
    delta = ablation_importance(model, windows())
    assert delta[DEAD] == 0.0
    assert (delta.abs() > 0).sum() > 20
    with torch.no_grad():
        clean = sum(model(input_ids=i, labels=i).loss.item() for i in windows()) / 3
        model.model.layers[2].self_attn.o_proj.weight[:, 4 * 6 : 5 * 6] = 0.0
        ablated = sum(model(input_ids=i, labels=i).loss.item() for i in windows()) / 3
    assert abs(delta[2, 4].item() - (ablated - clean)) < 1e-5
    mean = ablation_importance(model_with_a_dead_head(), windows(), mode="mean")
    assert abs(mean[DEAD].item()) < 1e-6  # a dead head's mean output is irrelevant too


def test_repeated_token_scores_read_the_right_diagonals():
    model = tiny_llama("gqa")
    scores = repeated_token_scores(model, n_batch=3, half=20)
    ids = repeated_tokens(97, 3, 20)
    maps = eager_maps(model, input_ids=ids)
    rows = torch.arange(20, 40)
    for layer in range(3):
        assert torch.allclose(scores["induction"][layer], maps[layer][:, :, rows, rows - 19].mean((0, 2)), atol=1e-5)
        assert torch.allclose(scores["duplicate_token"][layer], maps[layer][:, :, rows, rows - 20].mean((0, 2)), atol=1e-5)
    assert torch.equal(ids[:, :20], ids[:, 20:])
