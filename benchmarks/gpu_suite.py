"""One prepared GPU run: every Triton kernel of headlab.kernels against its torch path in bf16 and fp16,
then the headline timings of the three GPU benchmarks, in one JSON.

    python benchmarks/gpu_suite.py --out gpu_suite.json            # on an H100/H200, under 8 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --dry-run    # on a CPU: tiny shapes, no timings

It needs only torch and triton (the device machine's torch 2.11 / triton 3.6): it imports
``headlab.kernels`` straight from this repository's ``kernels/`` folder, which imports nothing of headlab
but its foundation ``core/``, and uses synthetic tensors only. Checks (each against the torch path of the same op on the
same low-precision inputs, computed in fp32 internally): every op of the kernel registry
(``headlab.kernels.all_ops()``) that has a Triton path, every one of its cases, on random attention calls
with each family quirk (causal, a sliding window, a soft-cap, learned sinks), output by output and, for
the differentiable ops (linear and LoLCATs hybrid attention, the TopK SAE encoder and sparse decoder),
gradient by gradient.

A check passes when the largest difference is within ``tolerance × (1 + max |reference|)``, with the
tolerance 2⁻⁶ for bf16 and 2⁻⁹ for fp16 (a few units of the dtype's rounding, which the Triton and torch
paths round at different points) and 1e-4 in the fp32 dry run. Timings (skipped in the dry run) call the
benchmark scripts' own functions at one headline size each, within a time budget.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"bfloat16": 2**-6, "float16": 2**-9, "float32": 1e-4}


def import_kernels():
    """``headlab.kernels`` from this checkout's ``kernels/`` folder (installed or not: the device
    machine has only torch, triton and transformers' dependencies); ``headlab.surgeon`` and
    ``headlab.sae`` are mapped too, for the benchmark scripts the timings call."""
    package = types.ModuleType("headlab")
    package.__path__ = [str(ROOT / "headlab")]
    sys.modules["headlab"] = package
    for part in ("core", "kernels", "surgeon", "sae"):  # the foundation first, then kernels: the others import it
        spec = importlib.util.spec_from_file_location(f"headlab.{part}", ROOT / part / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / part)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"headlab.{part}"] = module
        spec.loader.exec_module(module)
        setattr(package, part, module)
    return sys.modules["headlab.kernels"]


def close(got, want, dtype_name: str) -> tuple[bool, float]:
    """``(passed, largest difference)`` of two tensors (or None/None) under the dtype's tolerance."""
    if got is None or want is None:
        return got is None and want is None, 0.0
    got, want = got.detach().float(), want.detach().float()
    difference = float((got - want).abs().max()) if got.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    return difference <= TOLERANCE[dtype_name] * (1 + scale), difference


QUIRKS = ("causal", "window", "softcap", "sinks")


def call_with(quirk: str, torch, kernels, device, dtype, n: int, d: int):
    """A random attention call (4 query heads reading 2 KV heads) with one family quirk."""
    gen = torch.Generator(device="cpu").manual_seed(QUIRKS.index(quirk))
    extra = {"causal": {}, "window": {"window": n // 4}, "softcap": {"softcap": 20.0},
             "sinks": {"sinks": torch.randn(4, generator=gen)}}[quirk]
    return kernels.AttentionInputs.random(1, 4, 2, n, d, gen, dtype, device, **extra)


def check_ops(kernels, torch, device, dtype, n: int, d: int) -> list[dict]:
    """Every registered op with a Triton path, every case, on a call with each quirk: the Triton path
    against the torch path, output by output (gradients included)."""
    rows, name = [], str(dtype).split(".")[1]
    for quirk in QUIRKS:
        call = call_with(quirk, torch, kernels, device, dtype, n, d)
        for op in kernels.all_ops().values():
            if "triton" not in op.backends:
                continue
            for case in op.cases(call):
                got, want = case.run("triton"), case.run("torch")
                for field in want:
                    ok, diff = close(got[field], want[field], name)
                    rows.append({"op": op.name, "case": f"{case.name}, {quirk}", "field": field, "max_diff": diff,
                                 "passed": ok})
    return rows


def timings(budget_s: float) -> dict:
    """The three benchmarks at one headline size each (their own functions), while the budget lasts."""
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    started, out = time.perf_counter(), {}
    jobs = [("stats_gpu", lambda m: m.one_shape(1, 16, 16384, 128)),
            ("linear_gpu", lambda m: m.one_shape(1, 16, 16384, 128, 128, torch.bfloat16, None)),
            ("sae_gpu", lambda m: m.kernel_rows(torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16),
                                                24576, 32, torch.bfloat16))]
    for name, job in jobs:
        if time.perf_counter() - started > budget_s:
            out[name] = {"skipped": "time budget spent"}
            continue
        try:
            out[name] = job(__import__(name))
        except Exception as err:  # a timing that fails is recorded, the rest still runs
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_suite.json", help="the JSON to write")
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny shapes, no timings (under "
                        "TRITON_INTERPRET=1): checks that the suite is wired")
    parser.add_argument("--timing-budget", type=float, default=240.0, help="seconds for the timings")
    args = parser.parse_args()
    import torch

    kernels = import_kernels()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        device, dtypes, sizes = "cpu", [torch.float32], {"n": 64, "d": 16}
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: use --dry-run on a CPU")
        device, dtypes, sizes = "cuda", [torch.bfloat16, torch.float16], {"n": 1024, "d": 64}
    started = time.perf_counter()
    checks = []
    for dtype in dtypes:
        checks += check_ops(kernels, torch, device, dtype, sizes["n"], sizes["d"])
        for row in checks:
            row.setdefault("dtype", str(dtype).split(".")[1])
    import triton

    result = {
        "suite": "headlab GPU suite", "dry_run": args.dry_run,
        "machine": {"platform": platform.platform(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "triton": triton.__version__},
        "checks": checks, "all_passed": all(row["passed"] for row in checks),
        "check_seconds": round(time.perf_counter() - started, 1),
        "timings": {} if args.dry_run else timings(args.timing_budget),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    failed = [row for row in checks if not row["passed"]]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed; written {args.out}")
    for row in failed:
        print("FAILED", row)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
