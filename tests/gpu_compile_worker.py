"""Compile every Triton kernel of headlab.kernels for a real GPU target on a machine without one.

Run by test_gpu_compile.py in a process *without* TRITON_INTERPRET (so the kernels are real
``JITFunction``s). Kernel launches are intercepted instead of run: the public launchers are driven
with CPU tensors over the configurations they support (dtypes, flags, windows, top-k, SAE k), each
launch's argument types and constexprs are recorded, and every distinct one is compiled ahead of
time with Triton's CUDA backend for ``sm_90`` (H100/H200): Triton IR → LLVM → PTX → ``ptxas``. A
kernel's shared memory must also fit one H100 block. Outputs are zeros, so the torch glue between
launches runs; nothing here checks numbers (the interpreter tests do that).

Prints one JSON line: ``{"compiled": {kernel: variants}, "failed": [...]}``; exits 1 on a failure.
``--sweep`` compiles every supported configuration (about 300 variants, 15 minutes on 2 cores);
without it, the demanding corner (about 25 variants).
"""

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from headlab.kernels import _launch, all_ops
from headlab.kernels import attention_stats_triton as stats_triton
from headlab.kernels import linear_triton
from headlab.kernels import sae_codes_triton as sae_triton

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
           torch.int32: "*i32", torch.int8: "*i8", torch.bool: "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
launches: dict = {}


def _zeros(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


def _record(self, *args, grid, warmup, **kwargs):
    """Stands in for ``JITFunction.run``: remember the launch's types and constexprs. Nothing is
    written, so integer buffers are zeroed to keep the indices later torch glue gathers in range."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and not arg.is_floating_point():
            arg.data.zero_()  # through .data: autograd saved some of them
    bound = dict(zip(self.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for param in self.params:
        value = bound.get(param.name, param.default)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[param.name] = "fp32"
    options = tuple(sorted((k, kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs))
    key = (self.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), options)
    launches[key] = (self, signature, constexprs, dict(options))


def drive_stats(dtypes, dims):
    for dtype in dtypes:
        for dim in dims:
            q = torch.randn(1, 6, 100, dim, dtype=dtype)
            k = v = torch.randn(1, 2, 100, dim, dtype=dtype)
            valid = torch.ones(1, 100, dtype=torch.bool)
            for causal in (True, False):
                stats = stats_triton.attention_stats_triton(q, k, v, scale=0.1, causal=causal, q_offset=0, key_valid=valid,
                                                            key_groups=torch.ones(1, 2, 100), topk=8)
                stats_triton.attention_stats_triton(q, k, v, scale=0.1, causal=causal, q_offset=0)
                stats_triton.column_stats_triton(q, k, stats.lse, scale=0.1, causal=causal, q_offset=0,
                                                 key_valid=valid, query_valid=valid)
                stats_triton.column_stats_triton(q, k, stats.lse, scale=0.1, causal=causal, q_offset=0)
            quirks = dict(window=64, softcap=30.0)  # sliding-window and soft-capped layers (Gemma 2)
            stats = stats_triton.attention_stats_triton(q, k, v, scale=0.1, causal=True, q_offset=0, key_valid=valid,
                                                        key_groups=torch.ones(1, 2, 100), topk=8,
                                                        sinks=torch.zeros(6), **quirks)
            stats_triton.column_stats_triton(q, k, stats.lse, scale=0.1, causal=True, q_offset=0, key_valid=valid,
                                             query_valid=valid, **quirks)


def drive_linear(dtypes, dims, windows, terraces):
    for dtype in dtypes:
        for dim in dims:
            q, k, v = (torch.randn(1, 2, 300, dim, dtype=dtype, requires_grad=True) for _ in range(3))
            fq, fk = (torch.rand(1, 2, 300, 128, dtype=dtype, requires_grad=True) for _ in range(2))
            state = torch.zeros(1, 2, 128, dim + 1, requires_grad=True)
            out, final = linear_triton.linear_attention_triton(fq, fk, v, initial_state=state)
            (out.float().sum() + final.sum()).backward()
            gamma = torch.full((2,), 0.1, requires_grad=True)
            for window in windows:
                if linear_triton.hybrid_unsupported(window, dtype):  # refused with a clear error instead
                    continue
                for terrace in terraces:
                    out = linear_triton.hybrid_attention_triton(q, k, v, fq, fk, gamma, window=window,
                                                                terrace=terrace, scale=dim ** -0.5)
                    out.float().sum().backward()


def drive_sae(dtypes, shapes):
    for dtype in dtypes:
        for d_in, d_sae, k in shapes:
            x = torch.randn(8, d_in, dtype=dtype)
            w_enc = torch.randn(d_in, d_sae, dtype=dtype, requires_grad=True)
            b_enc = torch.zeros(d_sae, dtype=dtype, requires_grad=True)
            b_dec = torch.zeros(d_in, dtype=dtype, requires_grad=True)
            w_dec = torch.randn(d_sae, d_in, dtype=dtype, requires_grad=True)
            values, indices = sae_triton.topk_encode_triton(x, w_enc, b_enc, b_dec, k)
            sae_triton.sparse_decode_triton(values, indices, w_dec, b_dec).float().sum().backward()


DRIVEN = {"attention_with_stats": "drive_stats", "column_stats": "drive_stats", "linear_attention": "drive_linear",
          "hybrid_attention": "drive_linear", "topk_encode": "drive_sae", "sparse_decode": "drive_sae"}


def undriven() -> list[str]:
    """The registered ops with a Triton path that no driver here launches (they would go uncompiled)."""
    return sorted(name for name, op in all_ops().items() if "triton" in op.backends and name not in DRIVEN)


def drive(sweep: bool) -> None:
    """Every supported configuration (``sweep``), or the demanding corner CI compiles: the widest
    tiles (head dim 128, window 128, k 64) in bf16 and fp32."""
    if sweep:
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        drive_stats(dtypes, (64, 128))
        drive_linear(dtypes, (64, 128), linear_triton.WINDOWS, (True, False))
        drive_sae(dtypes, ((576, 18432, 32), (2048, 65536, 64), (4096, 16384, 512)))
    else:
        dtypes = (torch.bfloat16, torch.float32)
        drive_stats(dtypes, (128,))
        drive_linear(dtypes, (128,), (64, 128), (False,))
        drive_sae(dtypes, ((2048, 65536, 64),))


def main() -> None:
    JITFunction.run = _record
    _launch.output = _zeros
    drive("--sweep" in sys.argv)
    compiled, failed = {}, [{"kernel": name, "error": "registered with a Triton path, driven by no driver of "
                                                      "gpu_compile_worker.py"} for name in undriven()]
    for (name, *_), (kernel, signature, constexprs, options) in launches.items():
        try:
            binary = triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET, options=options)
            if binary.metadata.shared > SHARED_LIMIT:
                raise RuntimeError(f"needs {binary.metadata.shared} bytes of shared memory")
            compiled[name] = compiled.get(name, 0) + 1
        except Exception as err:  # report every failing variant, not only the first
            failed.append({"kernel": name, "constexprs": {k: str(v) for k, v in constexprs.items()},
                           "error": f"{type(err).__name__}: {str(err)[-600:]}"})
    print(json.dumps({"target": f"{TARGET.backend} sm_{TARGET.arch}", "triton": triton.__version__,
                      "compiled": compiled, "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
