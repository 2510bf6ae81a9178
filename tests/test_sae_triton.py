"""Triton TopK encoder and sparse decoder vs the dense references, forward and backward.

On a machine without CUDA these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
outputs are pre-filled with NaN there, so an element a kernel forgot to write fails the comparison.
"""

import pytest
import torch

from headlab.kernels.reference import sparse_decode_reference, topk_encode_reference
from headlab.kernels.sae_codes import sparse_decode, topk_encode

pytestmark = [pytest.mark.numerics, pytest.mark.slow]  # run again in CI with one thread and narrower vector units

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


def rel_error(x, y):
    x, y = x.detach().double(), y.detach().double()
    return float((x - y).pow(2).mean().sqrt() / (y.pow(2).mean().sqrt() + 1e-8))


def sae_tensors(rows, d, n, dtype, seed=0, dense_latent=None):
    """``x, [W_enc, b_enc, b_dec, W_dec], ∂x̂``; ``dense_latent`` gets a bias every row picks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen)
    w_enc, b_enc, b_dec, w_dec = (torch.randn(*s, generator=gen) for s in ((d, n), (n,), (d,), (n, d)))
    if dense_latent is not None:
        b_enc[dense_latent] = 50.0
    grad_out = torch.randn(rows, d, generator=gen)
    params = [p.to(DEVICE, dtype).requires_grad_() for p in (w_enc, b_enc, b_dec, w_dec)]
    return x.to(DEVICE, dtype), params, grad_out.to(DEVICE, dtype)


def run(x, params, grad_out, k, backend):
    w_enc, b_enc, b_dec, w_dec = params
    if backend == "reference":  # fp32 on the same (rounded) inputs: the specification
        upcast = [p.detach().float().requires_grad_() for p in params]
        w_enc, b_enc, b_dec, w_dec = upcast
        out = sparse_decode_reference(*topk_encode_reference(x.float(), w_enc, b_enc, b_dec, k), w_dec, b_dec)
        (out * grad_out.float()).sum().backward()
        return out, [p.grad for p in upcast]
    for p in params:
        p.grad = None
    values, indices = topk_encode(x, w_enc, b_enc, b_dec, k, backend=backend)
    out = sparse_decode(values, indices, w_dec, b_dec, backend=backend)
    (out * grad_out).sum().backward()
    return out, [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,d,n,k", [(37, 20, 300, 7), (16, 60, 200, 40), (5, 64, 130, 1)])
def test_triton_sae_matches_dense_reference(rows, d, n, k, dtype):
    x, params, grad_out = sae_tensors(rows, d, n, dtype, dense_latent=5 if k > 1 else None)
    got, got_grads = run(x, params, grad_out, k, "triton")
    want, want_grads = run(x, params, grad_out, k, "reference")
    assert rel_error(got, want) < TOLERANCE[dtype]
    for name, mine, theirs in zip(("W_enc", "b_enc", "b_dec", "W_dec"), got_grads, want_grads):
        assert mine.dtype == dtype and not mine.isnan().any(), name
        assert rel_error(mine, theirs) < TOLERANCE[dtype], name


@pytest.mark.parametrize("crowded", [False, True])
def test_triton_encoder_picks_the_reference_latents(crowded):
    x, (w_enc, b_enc, b_dec, _), _ = sae_tensors(37, 20, 300, torch.float32, seed=1)
    if crowded:  # every row's top 16 in the first latent tile: the running merge must keep all of them
        with torch.no_grad():
            b_enc[:16] += 30.0
    values, indices = topk_encode(x, w_enc, b_enc, b_dec, 16, backend="triton")
    want_values, want_indices = torch.relu((x - b_dec) @ w_enc + b_enc).topk(16, dim=1)
    assert torch.equal(indices, want_indices)
    assert torch.allclose(values, want_values, rtol=1e-5, atol=1e-6)


def test_triton_gradients_are_deterministic():
    x, params, grad_out = sae_tensors(37, 20, 300, torch.float32, dense_latent=3)
    _, first = run(x, params, grad_out, 7, "triton")
    _, second = run(x, params, grad_out, 7, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_backends_agree_and_large_k_is_refused_on_triton():
    x, params, grad_out = sae_tensors(12, 16, 600, torch.float32)
    triton_out, triton_grads = run(x, params, grad_out, 8, "triton")
    torch_out, torch_grads = run(x, params, grad_out, 8, "torch")
    assert rel_error(triton_out, torch_out) < 1e-5
    for a, b in zip(triton_grads, torch_grads):
        assert rel_error(a, b) < 1e-5
    with pytest.raises(ValueError, match="up to 512"):
        topk_encode(x, *params[:3], 513, backend="triton")
    with pytest.raises(ValueError, match="expected x"):
        topk_encode(x[:, :5], *params[:3], 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_ops_in_bf16_with_fp32_weights(backend):
    x, params, grad_out = sae_tensors(12, 16, 64, torch.float32)
    w_enc, b_enc, b_dec, w_dec = params
    with torch.autocast(x.device.type, torch.bfloat16):
        values, indices = topk_encode(x, w_enc, b_enc, b_dec, 4, backend=backend)
        out = sparse_decode(values, indices, w_dec, b_dec, backend=backend)
    assert values.dtype == out.dtype == torch.bfloat16
    (out.float() * grad_out).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    want, _ = run(x, params, grad_out, 4, "reference")
    assert rel_error(out, want) < 2e-2
