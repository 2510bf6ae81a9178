"""Triton linear and hybrid attention kernels vs the dense references, forward and backward.

On a machine without CUDA these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
outputs are pre-filled with NaN there, so an element a kernel forgot to write fails the comparison.
"""

import pytest
import torch

from headlab.kernels.linear import hybrid_attention, linear_attention
from headlab.kernels.reference import hybrid_attention_reference, linear_attention_reference

pytestmark = [pytest.mark.numerics, pytest.mark.slow]  # run again in CI with one thread and narrower vector units

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


def rel_error(x, y):
    x, y = x.double(), y.double()
    if (x - y).abs().max() <= 1e-6:
        return 0.0
    return float((x - y).pow(2).mean().sqrt() / (y.pow(2).mean().sqrt() + 1e-8))


def inputs(n, d=16, features=16, heads=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    fq, fk = (torch.rand(1, heads, n, features, generator=g) + 0.05 for _ in range(2))
    gamma = torch.rand(heads, generator=g) + 0.1
    return [t.to(DEVICE, dtype) for t in (q, k, v, fq, fk)] + [gamma.to(DEVICE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [63, 100, 200])
def test_linear_forward_matches_reference(n, dtype):
    _, _, v, fq, fk, _ = inputs(n, dtype=dtype)
    state0 = torch.rand(1, 2, 16, 17, device=DEVICE)
    for initial in (None, state0):
        got, state = linear_attention(fq, fk, v, initial_state=initial, backend="triton")
        want, want_state = linear_attention_reference(fq.float(), fk.float(), v.float(), initial_state=initial)
        assert rel_error(got, want) < TOLERANCE[dtype]
        assert rel_error(state, want_state) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("terrace", [True, False])
@pytest.mark.parametrize("n,window", [(63, 16), (100, 32), (200, 64)])
def test_hybrid_forward_matches_reference(n, window, terrace, dtype):
    q, k, v, fq, fk, gamma = inputs(n, dtype=dtype)
    got = hybrid_attention(q, k, v, fq, fk, gamma, window=window, terrace=terrace, backend="triton")
    want = hybrid_attention_reference(*(t.float() for t in (q, k, v, fq, fk)), gamma, window=window, terrace=terrace)
    assert rel_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("d", [64, 60])
def test_head_dims_64_and_60(d):
    q, k, v, fq, fk, gamma = inputs(100, d=d, features=2 * 32)
    got = hybrid_attention(q, k, v, fq, fk, gamma, window=64, backend="triton")
    assert rel_error(got, hybrid_attention_reference(q, k, v, fq, fk, gamma, window=64)) < 1e-5
    got, _ = linear_attention(fq, fk, v, backend="triton")
    assert rel_error(got, linear_attention_reference(fq, fk, v)[0]) < 1e-5


def _grads(fn, tensors, weight):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    (out.float() * weight).sum().backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("terrace", [True, False])
@pytest.mark.parametrize("n,d", [(63, 16), (100, 16), (70, 64)])  # d 64: values in two tiles (64 + ones)
def test_hybrid_gradients_match_reference(n, d, terrace):
    tensors = inputs(n, d=d)
    weight = torch.randn(1, 2, n, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)  # not the global RNG
    got = _grads(lambda *a: hybrid_attention(*a, window=16, terrace=terrace, backend="triton"), tensors, weight)
    want = _grads(lambda *a: hybrid_attention_reference(*a, window=16, terrace=terrace), tensors, weight)
    for name, g, w in zip(("q", "k", "v", "fq", "fk", "gamma"), got, want):
        # gamma's gradient sums B·T·V terms with cancellation: fp32 accumulation alone is ~1e-5 off
        # fp64 (the torch path too), so it gets 1e-4.
        assert rel_error(g, w) < (1e-4 if name == "gamma" else 1e-5), name


def test_linear_gradients_match_reference_including_the_states():
    _, _, v, fq, fk, _ = inputs(100)
    state0 = torch.rand(1, 2, 16, 17, device=DEVICE)
    weight = torch.randn(1, 2, 100, 16, device=DEVICE)

    def loss_of(fn):
        def run(fq, fk, v, s0):
            o, state = fn(fq, fk, v, s0)
            return o + 0 * o, state
        leaves = [t.clone().requires_grad_(True) for t in (fq, fk, v, state0)]
        o, state = run(*leaves)
        ((o * weight).sum() + state.pow(2).sum()).backward()
        return [t.grad for t in leaves]

    got = loss_of(lambda a, b, c, s: linear_attention(a, b, c, initial_state=s, backend="triton"))
    want = loss_of(lambda a, b, c, s: linear_attention_reference(a, b, c, initial_state=s))
    for name, g, w in zip(("fq", "fk", "v", "state0"), got, want):
        assert rel_error(g, w) < 1e-5, name


def test_unsupported_window_is_refused():
    q, k, v, fq, fk, gamma = inputs(40)
    with pytest.raises(ValueError, match="windows"):
        hybrid_attention(q, k, v, fq, fk, gamma, window=20, backend="triton")
