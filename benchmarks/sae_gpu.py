"""GPU benchmark: the Triton TopK encoder and sparse decoder against dense torch, and SAE training
throughput against a dense torch trainer (and SAELens where it imports), side by side in one run.

Needs CUDA; on a machine without one it exits with an error and writes nothing (no numbers are
invented). Synthetic bf16 activations, ``--batch`` rows (default 4096). Shapes: ``(d_in, d_sae, k)`` = (768, 24576, 32), (2048, 65536, 64) and (4096, 65536, 64), i.e.
``k/d_sae ≤ 1/256``. Timing: ``triton.testing.do_bench`` (warm-up 25 ms, rep 100 ms), median, after
one untimed call. Per shape:
  matmul            bare ``x @ W_enc`` (the encoder GEMM alone)
  encode_torch      ``topk(relu((x − b_dec) W_enc + b_enc))`` in torch
  encode_triton     ``topk_encode(backend="triton")`` (fused GEMM + ReLU + running top-k)
  decode_dense      ``codes @ W_dec + b_dec`` on the dense ``[B, d_sae]`` code
  decode_sparse     ``sparse_decode(backend="triton")`` (embedding-bag rows)
each forward and forward+backward, and a whole training step (forward, backward, Adam; steps from
``sae_steps.py``, under bf16 autocast with fp32 weights):
  step_dense        plain dense TopK autoencoder in torch
  step_headlab      headlab's TopK step (Triton kernels, decoder constraint, clipping)
  step_saelens      SAELens' TopK training step where ``sae_lens`` imports (carry its wheel)
Reported ratios: encode_triton / matmul (target ≤ 1.15 at d_sae ≥ 32K), decode_dense / decode_sparse
(target ≥ 3), and tokens/s of the steps.

    python benchmarks/sae_gpu.py --out benchmarks/results/sae_gpu.json
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from gpu_timing import median_ms
from sae_steps import dense_step, headlab_step, saelens_step

from headlab.kernels.sae_codes import dense_codes, sparse_decode, topk_encode
from headlab.sae import SparseAutoencoder
from headlab.core.files import write_json

SHAPES = ((768, 24576, 32), (2048, 65536, 64), (4096, 65536, 64))


def with_backward(fn, params):
    def run():
        out = fn()
        out.float().pow(2).sum().backward()
        for p in params:
            p.grad = None
    return run


def kernel_rows(x, d_sae, k, dtype) -> dict:
    d_in = x.shape[1]
    w_dec = F.normalize(torch.randn(d_sae, d_in, device="cuda"), dim=1).to(dtype).requires_grad_()
    w_enc = w_dec.detach().t().contiguous().requires_grad_()
    b_enc = torch.zeros(d_sae, device="cuda", dtype=dtype, requires_grad=True)
    b_dec = torch.zeros(d_in, device="cuda", dtype=dtype, requires_grad=True)
    params = (w_enc, b_enc, b_dec, w_dec)
    values, indices = topk_encode(x, w_enc, b_enc, b_dec, k, backend="torch")
    values = values.detach().requires_grad_()
    codes = dense_codes(values.detach(), indices, d_sae).requires_grad_()

    def encode_torch():
        return torch.relu(torch.addmm(b_enc, x - b_dec, w_enc)).topk(k, dim=1).values

    fns = {
        "matmul": lambda: x @ w_enc,
        "encode_torch": encode_torch,
        "encode_triton": lambda: topk_encode(x, w_enc, b_enc, b_dec, k, backend="triton")[0],
        "decode_dense": lambda: torch.addmm(b_dec, codes, w_dec),
        "decode_sparse": lambda: sparse_decode(values, indices, w_dec, b_dec, backend="triton"),
    }
    ms = {}
    for name, fn in fns.items():
        ms[f"{name}_fwd"] = median_ms(fn)
        ms[f"{name}_fwd_bwd"] = median_ms(with_backward(fn, (*params, values, codes)))
    return ms


def training_steps(x, d_sae, k) -> dict:
    """Tokens/s of one optimiser step under bf16 autocast (fp32 weights): dense torch, headlab, and
    SAELens where it imports."""
    d_in, rows = x.shape[1], x.shape[0]
    x = x.float()
    sae = SparseAutoencoder(d_in, d_sae, "topk", k).cuda()
    steps = {"dense": dense_step(sae, k), "headlab": headlab_step(sae, k)}
    saelens, note = saelens_step(d_in, d_sae, k, "cuda")
    if saelens is not None:
        steps["saelens"] = saelens
    out = {"saelens": note}
    for name, step in steps.items():
        def run(step=step):
            with torch.autocast("cuda", torch.bfloat16):
                step(x)
        ms = median_ms(run)
        out[f"step_{name}_ms"] = ms
        out[f"step_{name}_tokens_per_s"] = round(rows / ms * 1000) if ms else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--out", default="benchmarks/results/sae_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sae_gpu.py needs a CUDA GPU; nothing was measured")
    import triton

    torch.manual_seed(0)
    rows = []
    for d_in, d_sae, k in SHAPES:
        x = torch.randn(args.batch, d_in, device="cuda", dtype=torch.bfloat16)
        row = {"d_in": d_in, "d_sae": d_sae, "k": k, "batch": args.batch, "ms": kernel_rows(x, d_sae, k, torch.bfloat16)}
        ms = row["ms"]
        for mode in ("fwd", "fwd_bwd"):
            if ms[f"matmul_{mode}"] and ms[f"encode_triton_{mode}"]:
                row[f"encode_over_matmul_{mode}"] = round(ms[f"encode_triton_{mode}"] / ms[f"matmul_{mode}"], 3)
            if ms[f"decode_dense_{mode}"] and ms[f"decode_sparse_{mode}"]:
                row[f"decode_speedup_{mode}"] = round(ms[f"decode_dense_{mode}"] / ms[f"decode_sparse_{mode}"], 3)
        row.update(training_steps(x, d_sae, k))
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                          "host": platform.node(), "dtype": "bfloat16", "rows": rows})


if __name__ == "__main__":
    main()
