"""GPU timing shared by the benchmark scripts."""

from __future__ import annotations

import torch


def median_ms(fn) -> float | None:
    """Median milliseconds of ``fn()`` by ``triton.testing.do_bench`` (warm-up 25 ms, rep 100 ms)
    after one untimed call (compilation, autotuning); None when it runs out of GPU memory."""
    import triton

    try:
        fn()
        return round(float(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]), 4)
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()
