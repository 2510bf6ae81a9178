"""Linear and hybrid attention ops: chunked torch path vs the dense references, gradients, oracles."""

import pytest
import torch
import torch.nn.functional as F

from headlab.kernels.linear import hybrid_attention, linear_attention
from headlab.kernels.linear_torch import hybrid_step_torch, window_starts, with_ones
from headlab.kernels.reference import (hybrid_attention_reference, linear_attention_reference,
                                       window_mask_reference)

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units


def inputs(batch=2, heads=3, n=100, d=8, features=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g, dtype=dtype) for _ in range(3))
    fq, fk = (torch.rand(batch, heads, n, features, generator=g, dtype=dtype) + 0.05 for _ in range(2))
    gamma = torch.rand(heads, generator=g) + 0.1
    return q, k, v, fq, fk, gamma


def rel_error(x, y):
    return float((x.double() - y.double()).pow(2).mean().sqrt() / (y.double().pow(2).mean().sqrt() + 1e-8))


@pytest.mark.parametrize("n", [1, 63, 64, 100, 200])
def test_chunked_linear_attention_matches_reference(n):
    _, _, v, fq, fk, _ = inputs(n=n)
    state0 = torch.rand(2, 3, 10, 9)
    for normalize in (True, False):
        for initial in (None, state0):
            got, state = linear_attention(fq, fk, v, normalize=normalize, initial_state=initial, backend="torch")
            want, want_state = linear_attention_reference(fq, fk, v, normalize=normalize, initial_state=initial)
            assert rel_error(got, want) < 1e-5 and rel_error(state, want_state) < 1e-5


@pytest.mark.parametrize("terrace", [True, False])
@pytest.mark.parametrize("n,window", [(63, 16), (100, 16), (200, 64), (37, 5), (50, 64)])
def test_chunked_hybrid_matches_reference(n, window, terrace):
    q, k, v, fq, fk, gamma = inputs(n=n)
    got = hybrid_attention(q, k, v, fq, fk, gamma, window=window, terrace=terrace, backend="torch")
    want = hybrid_attention_reference(q, k, v, fq, fk, gamma, window=window, terrace=terrace)
    assert rel_error(got, want) < 1e-5


@pytest.mark.parametrize("terrace", [True, False])
def test_a_window_longer_than_the_input_costs_the_input_not_the_window(terrace):
    """One chunk of the input's length: a 100,000-token window on 50 tokens allocates nothing of the
    window's size (a chunk of the window's size would ask for 2·10^10 scores per head)."""
    q, k, v, fq, fk, gamma = inputs(n=50)
    got = hybrid_attention(q, k, v, fq, fk, gamma, window=100_000, terrace=terrace, backend="torch")
    want = hybrid_attention_reference(q, k, v, fq, fk, gamma, window=50, terrace=terrace)  # every key in the window
    assert rel_error(got, want) < 1e-5


def test_window_masks_have_the_documented_extent():
    terrace = window_mask_reference(300, 64, terrace=True)
    sliding = window_mask_reference(300, 64, terrace=False)
    assert terrace.sum(-1)[64:].min() == 65 and terrace.sum(-1).max() == 128  # 64..128 recent keys
    assert int(sliding.sum(-1)[63:].unique().item()) == 64
    for mask, terr in ((terrace, True), (sliding, False)):
        first = mask.int().argmax(-1)
        assert torch.equal(first, window_starts(torch.arange(300), 64, terr))


@pytest.mark.parametrize("terrace", [True, False])
def test_gradients_match_reference(terrace):
    base = inputs(n=75, d=6, features=4)
    grads = []
    for fn in (lambda *a: hybrid_attention(*a, window=16, terrace=terrace, backend="torch"),
               lambda *a: hybrid_attention_reference(*a, window=16, terrace=terrace)):
        leaves = [t.clone().requires_grad_(True) for t in base]
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("q", "k", "v", "fq", "fk", "gamma"), *grads):
        # gamma's gradient sums B·T·V terms with cancellation: fp32 accumulation is ~1e-5 off fp64.
        assert rel_error(got, want) < (1e-4 if name == "gamma" else 1e-5), name


def test_linear_gradients_match_reference():
    _, _, v, fq, fk, _ = inputs(n=90)
    grads = []
    for fn in (lambda *a: linear_attention(*a, backend="torch")[0], lambda *a: linear_attention_reference(*a)[0]):
        leaves = [t.clone().requires_grad_(True) for t in (fq, fk, v)]
        fn(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert rel_error(got, want) < 1e-5


def test_window_covering_everything_is_full_softmax_for_any_gamma():
    q, k, v, fq, fk, _ = inputs(n=40)
    softmax = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for gamma in (torch.full((3,), 1e-3), torch.full((3,), 7.0)):
        got = hybrid_attention(q, k, v, fq, fk, gamma, window=64, terrace=False, backend="torch")
        assert rel_error(got, softmax) < 1e-5


def test_large_gamma_is_sliding_window_softmax():
    q, k, v, fq, fk, _ = inputs(n=80)
    got = hybrid_attention(q, k, v, fq, fk, torch.full((3,), 1e9), window=16, terrace=False, backend="torch")
    mask = window_mask_reference(80, 16, terrace=False)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_error(got, want) < 1e-5


def test_window_maximum_is_part_of_the_function():
    """Adding a constant to one row's logits changes the output (the sum is not shift-invariant)."""
    q, k, v, fq, fk, gamma = inputs(n=70)
    base = hybrid_attention(q, k, v, fq, fk, gamma, window=16, backend="torch")
    scaled = hybrid_attention(q * 3, k, v, fq, fk, gamma, window=16, backend="torch")
    want = hybrid_attention_reference(q * 3, k, v, fq, fk, gamma, window=16)
    assert rel_error(scaled, want) < 1e-5 and rel_error(scaled, base) > 1e-3


@pytest.mark.parametrize("window", [0, 8])
def test_step_from_a_state_matches_the_parallel_form(window):
    """Prefix folded into a state, the rest computed by the dense step: equals the parallel output."""
    q, k, v, fq, fk, gamma = inputs(n=45)
    first = 30
    if window:
        want = hybrid_attention_reference(q, k, v, fq, fk, gamma, window=window, terrace=True)
        key_start = int(window_starts(torch.tensor(first), window, True))
    else:
        want = linear_attention_reference(fq, fk, v)[0]
        key_start = first
    state = fk[:, :, :key_start].transpose(-1, -2) @ with_ones(v[:, :, :key_start])
    got = hybrid_step_torch(q[:, :, first:], k[:, :, key_start:], v[:, :, key_start:], fq[:, :, first:],
                            fk[:, :, key_start:], gamma, state, first_position=first, key_start=key_start,
                            window=window, terrace=True, scale=8 ** -0.5)
    assert rel_error(got, want[:, :, first:]) < 1e-5


def test_bad_shapes_are_refused():
    q, k, v, fq, fk, gamma = inputs(n=10)
    with pytest.raises(ValueError, match="gamma"):
        hybrid_attention(q, k, v, fq, fk, gamma[:2])
    with pytest.raises(ValueError, match="v "):
        linear_attention(fq, fk, v[:, :, :5])
    with pytest.raises(ValueError, match="window"):
        hybrid_attention(q, k, v, fq, fk, gamma, window=0)
