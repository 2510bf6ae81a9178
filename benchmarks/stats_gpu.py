"""GPU benchmark: the Triton attention-statistics forward vs SDPA with the flash backend.

Needs CUDA; on a machine without one it exits with an error and writes nothing (no numbers are
invented). Synthetic bf16 tensors, causal, ``B·H`` heads (default 1 × 16, at least 16 as the
issue asks), head dims 64 and 128, N = 4K, 16K, 32K, 128K. Timing: ``triton.testing.do_bench``
(warm-up 25 ms, rep 100 ms), median, after one untimed call. Measured in one run per shape:
  sdpa_flash     causal SDPA with only the FLASH backend enabled (the baseline)
  stats          ``attention_with_stats``: output, LSE, entropy and the first token's (sink) mass
  stats_top8     the same plus the top-8 keys of every row
  columns        ``column_stats``: the second pass (column sums and counts) reusing the LSE
Throughput is ``4·B·H·N²·D/2`` FLOP (causal) per second; ratios are taken within the run:
targets (issue): stats ≥ 0.85× flash throughput, top-8 adds ≤ 25 % to stats, the column pass
≤ 0.6× the stats forward, and every length runs, including 128K where a map cannot be built
(``map_gib`` is what one fp32 map of the shape would need).

    python benchmarks/stats_gpu.py --out benchmarks/results/stats_gpu.json
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from gpu_timing import median_ms

from headlab.kernels import attention_with_stats, column_stats
from headlab.core.files import write_json

TARGETS = {"stats_over_flash_throughput": ">= 0.85", "top8_over_stats_time": "<= 1.25",
           "columns_over_stats_time": "<= 0.6"}


def one_shape(batch: int, heads: int, n: int, dim: int) -> dict:
    """Times of the four modes for one ``[batch, heads, n, dim]`` causal problem."""
    q, k, v = (torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sink = torch.zeros(batch, 1, n, dtype=torch.bool, device="cuda")
    sink[..., 0] = True

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def stats(topk=0):
        return attention_with_stats(q, k, v, key_groups=sink, topk=topk, backend="triton")

    lse = stats().lse
    ms = {
        "sdpa_flash": median_ms(sdpa),
        "stats": median_ms(stats),
        "stats_top8": median_ms(lambda: stats(8)),
        "columns": median_ms(lambda: column_stats(q, k, lse, backend="triton")),
    }
    flop = 4 * batch * heads * n * n * dim / 2
    row = {"batch": batch, "heads": heads, "n": n, "dim": dim, "map_gib": round(batch * heads * n * n * 4 / 2**30, 1),
           "ms": ms,
           "tflops": {name: round(flop / (t * 1e-3) / 1e12, 1) for name, t in ms.items()
                      if t is not None and name != "columns"}}
    if ms["sdpa_flash"] and ms["stats"]:
        row["stats_over_flash_throughput"] = round(ms["sdpa_flash"] / ms["stats"], 3)
    if ms["stats"] and ms["stats_top8"]:
        row["top8_over_stats_time"] = round(ms["stats_top8"] / ms["stats"], 3)
    if ms["stats"] and ms["columns"]:
        row["columns_over_stats_time"] = round(ms["columns"] / ms["stats"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/stats_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("stats_gpu.py needs a CUDA GPU; nothing was measured")
    if args.batch * args.heads < 16:
        raise SystemExit("use at least 16 heads in total (--batch × --heads), as the issue's benchmark asks")
    import triton

    rows = []
    for dim in args.dims:
        for n in args.lengths:
            rows.append(one_shape(args.batch, args.heads, n, dim))
            print(rows[-1], flush=True)
    write_json(args.out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "triton": triton.__version__, "host": platform.node(), "dtype": "bfloat16",
                          "causal": True, "targets": TARGETS, "rows": rows})


if __name__ == "__main__":
    main()
