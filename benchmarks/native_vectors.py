"""The native row pass of the CPU statistics built for 32-byte (AVX2) and 64-byte (AVX-512) vectors,
timed side by side in one run on the same logits (rows of 2048 and 8192 keys, top-8 keys kept).

    python benchmarks/native_vectors.py --out benchmarks/results/native_vectors.json

On a CPU without AVX-512 only the AVX2 build runs. Each timing is the median of 7 calls after one
untimed call; the ratio is AVX-512 time / AVX2 time (below 1: the wider build is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time

import torch
from machine import cpu_model

from headlab.kernels import native
from headlab.core.files import write_json


def library(vector: str) -> ctypes.CDLL:
    previous = os.environ.get("HEADLAB_NATIVE_VECTOR")
    os.environ["HEADLAB_NATIVE_VECTOR"] = vector
    try:
        return native.load(native.build())
    finally:
        if previous is None:
            os.environ.pop("HEADLAB_NATIVE_VECTOR")
        else:
            os.environ["HEADLAB_NATIVE_VECTOR"] = previous


def median_seconds(lib, logits: torch.Tensor, k: int) -> float:
    rows, n = logits.shape
    out = [torch.empty(rows), torch.empty(rows), torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64)]
    times = []
    for repeat in range(8):
        work = logits.clone()
        started = time.perf_counter()
        lib.headlab_row_stats(work.data_ptr(), rows, n, k, *(t.data_ptr() for t in out))
        if repeat:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/native_vectors.json")
    args = parser.parse_args()
    capability = torch.backends.cpu.get_cpu_capability()
    builds = {"avx2": library("avx2")}
    if capability == "AVX512":
        builds["avx512"] = library("avx512")
    rows = []
    for n in (2048, 8192):
        logits = torch.randn(4096 if n == 2048 else 1024, n, generator=torch.Generator().manual_seed(n)) * 4
        row = {"keys": n, "rows": logits.shape[0]}
        for name, lib in builds.items():
            row[f"{name}_seconds"] = median_seconds(lib, logits, 8)
        if "avx512" in builds:
            row["avx512_over_avx2"] = row["avx512_seconds"] / row["avx2_seconds"]
        rows.append(row)
        print(row)
    write_json(args.out, {"benchmark": "native row pass: 32-byte vs 64-byte vectors", "machine": {
        "platform": platform.platform(), "cpu": cpu_model(), "vector_unit": capability}, "rows": rows})


if __name__ == "__main__":
    main()
