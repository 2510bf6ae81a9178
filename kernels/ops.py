"""The registry of kernel ops. Each op's public module registers one :class:`Op` per public function:
its name, the backends it has, and its cases: given the tensors of one attention call
(:class:`AttentionInputs`), the inputs the op is run on and a runner that computes the op's named
outputs (and, for differentiable ops, the gradients of a fixed weighting of them) through a backend or
through its reference in :mod:`.reference`.

The registry is what checks an op, wherever it is added: the contract tests run every case on the
attention calls of tiny models of several families against the reference (in fp32 and float64), the
GPU suite runs every Triton path against the torch path in bf16 and fp16, and the GPU compile check
lists the Triton ops it must compile. Adding an op is one public module that registers it (plus its
torch and Triton files and its reference).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import import_module
from typing import Callable

import torch

BUILTIN_MODULES = ("attention_stats", "columns", "linear", "sae_codes")
REFERENCE = "reference"  # the backend name under which a case runs the op's reference


@dataclass(frozen=True)
class AttentionInputs:
    """The tensors of one attention call that every op's cases are built from: ``q [B, Hq, N, D]`` and
    ``k, v [B, Hkv, N, D]`` (after rotary positions and norms, K/V not expanded for GQA), the logits'
    ``scale``, and the family's quirks (``window`` keys per causal row, ``softcap``, learned ``sinks
    [Hq]``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> "AttentionInputs":
        """The same call with its tensors in ``dtype`` (float64 for the exact reference)."""
        return replace(self, q=self.q.to(dtype), k=self.k.to(dtype), v=self.v.to(dtype),
                       sinks=None if self.sinks is None else self.sinks.to(dtype))

    @property
    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v`` repeated to the query heads ``[B, Hq, N, D]`` (for ops that take expanded heads)."""
        group = self.q.shape[1] // self.k.shape[1]
        return self.k.repeat_interleave(group, 1), self.v.repeat_interleave(group, 1)

    @classmethod
    def random(cls, batch: int, heads: int, kv_heads: int, n: int, dim: int, generator: torch.Generator,
               dtype: torch.dtype = torch.float32, device="cpu", **quirks) -> "AttentionInputs":
        """A call of standard-normal ``q, k, v`` (drawn on the CPU with ``generator``)."""
        q = torch.randn(batch, heads, n, dim, generator=generator)
        k, v = (torch.randn(batch, kv_heads, n, dim, generator=generator) for _ in range(2))
        sinks = quirks.pop("sinks", None)
        return cls(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), dim ** -0.5,
                   sinks=None if sinks is None else sinks.to(device, dtype), **quirks)


Outputs = dict[str, "torch.Tensor | None"]


@dataclass(frozen=True)
class Case:
    """One way to run an op on a call: ``run(backend)`` returns its named outputs (``backend`` is one
    of the op's backends, or :data:`REFERENCE`)."""

    name: str
    run: Callable[[str], Outputs]


@dataclass(frozen=True)
class Op:
    """A kernel op: its public function's name, a one-line summary, the backends it has besides its
    reference, and its cases on an attention call."""

    name: str
    summary: str
    backends: tuple[str, ...]
    cases: Callable[[AttentionInputs], list[Case]]


OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    """Make ``op`` known to the contract tests, the GPU suite and the compile check."""
    if op.name in OPS and OPS[op.name] != op:
        raise ValueError(f"kernel op {op.name!r} is registered already")
    unknown = set(op.backends) - {"torch", "triton"}
    if unknown or "torch" not in op.backends:
        raise ValueError(f"kernel op {op.name!r}: backends must include 'torch' and may add 'triton', "
                         f"got {op.backends}")
    OPS[op.name] = op
    return op


def all_ops() -> dict[str, Op]:
    """Every registered op, the built-in ones loaded first."""
    for module in BUILTIN_MODULES:
        import_module(f".{module}", __package__)
    return OPS


def gradients(output: torch.Tensor, inputs: dict[str, torch.Tensor], seed: int = 0) -> Outputs:
    """``{"grad_<name>": ∂(w · output)/∂input}`` for a fixed random weighting ``w`` of ``output`` (seeded,
    drawn on the CPU), over the ``inputs`` that require gradients."""
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output.device, output.dtype)
    leaves = {name: t for name, t in inputs.items() if t.requires_grad}
    grads = torch.autograd.grad((output * weight).sum(), list(leaves.values()), allow_unused=True)
    return {f"grad_{name}": grad for name, grad in zip(leaves, grads)}


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy of ``t`` that requires gradients."""
    return t.detach().clone().requires_grad_(True)


__all__ = ["AttentionInputs", "Case", "OPS", "Op", "REFERENCE", "all_ops", "gradients", "leaf", "register_op"]
