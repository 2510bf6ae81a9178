"""GPU benchmark: Triton linear and hybrid attention vs SDPA (flash backend) and flash-linear-attention.

Needs CUDA; on a machine without one it exits with an error and writes nothing (no numbers are
invented). Shapes: ``H`` heads of dim ``D`` (default 16 × 128, bf16), ``B·N`` about
``--tokens`` (16K) tokens, N from 1K to 64K; Hedgehog features ``K = 2F = 128``, hybrid window 64.
Timing: ``triton.testing.do_bench`` (warm-up 25 ms, rep 100 ms), median; every shape is run once
before timing. Forward and forward+backward are measured for
  sdpa_flash   softmax attention, causal, SDPA with only the FLASH backend enabled (the baseline)
  linear       ``linear_attention`` (normalised) on feature-mapped q, k
  hybrid       ``hybrid_attention`` (terrace window 64 + linear)
  fla_chunk    ``fla.ops.linear_attn.chunk_linear_attn`` (normalised) where it imports
and ratios against SDPA-FLASH and fla are taken within this one run.

    python benchmarks/linear_gpu.py --out benchmarks/results/linear_gpu.json
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from gpu_timing import median_ms

from headlab.kernels.linear import hybrid_attention, linear_attention
from headlab.core.files import write_json


def timed_step(fn, backward: bool, grads):
    """``fn`` followed, when ``backward``, by a backward pass with ``grads``."""
    def run():
        out = fn()
        if backward:
            out.backward(grads)
    return run


def fla_chunk():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as err:  # fla absent or incompatible with this torch/triton
        return None, f"{type(err).__name__}: {err}"
    return chunk_linear_attn, None


def one_shape(batch, heads, n, dim, features, dtype, fla) -> dict:
    dev = "cuda"
    q, k, v = (torch.randn(batch, heads, n, dim, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    fq, fk = (torch.rand(batch, heads, n, features, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    gamma = torch.full((heads,), 0.1, device=dev)
    grad = torch.randn(batch, heads, n, dim, device=dev, dtype=dtype)

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    candidates = {
        "sdpa_flash": sdpa,
        "linear": lambda: linear_attention(fq, fk, v, backend="triton")[0],
        "hybrid": lambda: hybrid_attention(q, k, v, fq, fk, gamma, window=64, backend="triton"),
    }
    if fla is not None:
        fq_t, fk_t, v_t = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (fq, fk, v))
        candidates["fla_chunk"] = lambda: fla(fq_t, fk_t, v_t, scale=1.0, normalize=True)[0].transpose(1, 2)
    row = {"batch": batch, "heads": heads, "n": n, "dim": dim, "features": features, "ms": {}}
    for name, fn in candidates.items():
        for backward in (False, True):
            key = f"{name}_{'fwd_bwd' if backward else 'fwd'}"
            row["ms"][key] = median_ms(timed_step(fn, backward, grad))
    ms = row["ms"]
    for mode in ("fwd", "fwd_bwd"):
        for ours in ("linear", "hybrid"):
            if ms.get(f"sdpa_flash_{mode}") and ms.get(f"{ours}_{mode}"):
                row[f"speedup_{ours}_vs_sdpa_{mode}"] = round(ms[f"sdpa_flash_{mode}"] / ms[f"{ours}_{mode}"], 3)
            if ms.get(f"fla_chunk_{mode}") and ms.get(f"{ours}_{mode}"):
                row[f"ratio_{ours}_over_fla_{mode}"] = round(ms[f"{ours}_{mode}"] / ms[f"fla_chunk_{mode}"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--tokens", type=int, default=16384, help="batch x length per shape")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--features", type=int, default=128, help="feature-map width K = 2F")
    parser.add_argument("--out", default="benchmarks/results/linear_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("linear_gpu.py needs a CUDA GPU; nothing was measured")
    import triton

    fla, fla_error = fla_chunk()
    rows = []
    for n in args.lengths:
        row = one_shape(max(1, args.tokens // n), args.heads, n, args.dim, args.features, torch.bfloat16, fla)
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                          "host": platform.node(), "dtype": "bfloat16", "fla": fla_error or "imported", "rows": rows})


if __name__ == "__main__":
    main()
