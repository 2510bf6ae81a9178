"""What a run will need, estimated before any weight is read, against what the machine has.

A command describes its work as the forward passes it makes (:class:`Forward`: tokens, batch,
whether activations are kept for a backward, how many ``[tokens, tokens]`` maps are alive at once)
plus any buffers, and the files it writes; :func:`estimate` turns that and the model's size into a
peak memory, and :func:`check_need` refuses in one line what does not fit, naming the setting to
lower. The per-token costs are fp32 activations per layer, measured on SmolLM2-135M and Gemma 3
270M on CPU and rounded up (an estimate meant to catch settings that cannot fit, not to budget
tightly). ``HEADLAB_MEMORY_BUDGET`` (e.g. ``8GiB``) replaces what headlab takes as available.
Long backward passes recompute each block (:data:`RECOMPUTE_ABOVE_BYTES`) and chunk their logits
(:data:`LOGITS_ABOVE_BYTES`) where the run does so (``Forward.recompute``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .distributed import started_by_torchrun
from .errors import HeadlabError

FLOAT = 4  # bytes per activation: the models run in fp32 on the CPU
# fp32 values per token and layer, as multiples of (hidden size, intermediate size, attention width
# (query + key + value heads x head dimension)): alive during one layer's forward without gradients,
# and kept per layer for a backward. Fitted to SmolLM2-135M and Gemma 3 270M at 512-4096 tokens
# (the estimate is 1.1-2.1x the measured peak; benchmarks/memory_estimate.py)
TRANSIENT = (12, 4, 2)
KEPT = (8, 4, 2)
LOGIT_COPIES = (2.5, 4)  # copies of the [tokens, vocab] logits alive: without and with a backward
MARGIN = 1.15  # on the activations: what the fit leaves out (allocator slack, other families' extras)
LOAD_FACTOR = 2.0  # loading holds the checkpoint's tensors and the model's at once
RECOMPUTE_ABOVE_BYTES = 2 * 2**30  # kept activations beyond which headlab's long backward passes recompute blocks
LOGITS_ABOVE_BYTES = 512 * 2**20  # fp32 logits of a whole input beyond which a loss is computed in chunks
LOGITS_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one such chunk
FIXED = 3 << 29  # the interpreter, torch, transformers, tokenizers and their first-call buffers
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
          "TiB": 2**40}


@dataclass(frozen=True)
class Forward:
    """One forward pass of ``batch`` sequences of ``tokens`` tokens; ``grad``: activations kept for
    a backward through every layer; ``maps``: ``[tokens, tokens]`` fp32 maps alive at once (recorded
    attention, a layer's edited heads); ``logits``: ``"loss"`` (every position's logits and a loss or
    log-probabilities over them), ``"all"`` (every position's logits, nothing more) or ``"last"``
    (the last position's: generation). ``recompute``: the backward recomputes each block beyond
    :data:`RECOMPUTE_ABOVE_BYTES` of kept activations and makes a loss's logits in chunks beyond
    :data:`LOGITS_ABOVE_BYTES` (headlab's own long backward passes)."""

    tokens: int
    batch: int = 1
    grad: bool = False
    maps: int = 0
    logits: str = "loss"
    recompute: bool = False


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs of a model: parameters and the sizes of one layer."""

    parameters: int
    n_layers: int
    hidden: int
    intermediate: int
    attention: int  # (query heads + 2 x KV heads) x head dimension
    vocab: int

    @property
    def weight_bytes(self) -> int:
        return self.parameters * FLOAT


@dataclass
class Need:
    """A run's estimated peak memory (bytes), the bytes it writes into each folder, and the settings
    to lower when it does not fit (e.g. ``"--tokens or --needle-lengths"``)."""

    memory: int
    lower: str
    disk: dict[str, int] = field(default_factory=dict)


def forward_bytes(size: ModelSize, forward: Forward) -> int:
    """Peak activation bytes of one forward (and its backward with ``grad``), beyond the weights."""
    rows = forward.batch * forward.tokens
    kept = kept_activation_bytes(size, rows) if forward.grad else 0
    if forward.recompute and kept > RECOMPUTE_ABOVE_BYTES:  # each block's input kept, one block's activations
        kept = size.n_layers * rows * size.hidden * FLOAT + kept // size.n_layers
    copies = {"loss": LOGIT_COPIES[forward.grad], "all": 1.0, "last": 1.0}[forward.logits]
    logits = (forward.batch if forward.logits == "last" else rows) * size.vocab * FLOAT * copies
    if forward.recompute and forward.logits == "loss" and rows * size.vocab * FLOAT > LOGITS_ABOVE_BYTES:
        logits = LOGITS_CHUNK_BYTES * copies
    maps = forward.maps * forward.batch * forward.tokens ** 2 * FLOAT
    return int(MARGIN * (rows * _per_token(size, TRANSIENT) + kept + logits + maps))


def kept_activation_bytes(size: ModelSize, tokens: int, element: int = FLOAT) -> int:
    """Bytes a model's blocks keep for the backward pass of ``tokens`` tokens (``element`` bytes a value)."""
    return int(size.n_layers * tokens * _per_token(size, KEPT) / FLOAT * element)


def _per_token(size: ModelSize, units: tuple[float, float, float]) -> float:
    return (units[0] * size.hidden + units[1] * size.intermediate + units[2] * size.attention) * FLOAT


def estimate(size: ModelSize, forwards: list[Forward], extra: int = 0, lower: str = "",
             disk: dict[str, int] | None = None, weights_in_memory: int | None = None) -> Need:
    """The :class:`Need` of a run that loads the model once and makes ``forwards`` one after another
    (the largest one sets the peak), with ``extra`` bytes of its own buffers alive throughout.
    ``weights_in_memory``: the weights' bytes kept in memory when not all are (``--max-memory``)."""
    weights = size.weight_bytes if weights_in_memory is None else min(weights_in_memory, size.weight_bytes)
    work = max((forward_bytes(size, forward) for forward in forwards), default=0)
    loading, working = int(weights * LOAD_FACTOR), weights + work + extra
    if loading >= working:  # no setting of the run lowers this peak
        lower = "--max-memory (loading the model's weights is the peak), or use a machine with more memory"
    return Need(FIXED + max(loading, working), lower, dict(disk or {}))


def parse_size(text: str) -> int:
    """Bytes of a size such as ``300MB`` or ``8GiB``; :class:`HeadlabError` otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise HeadlabError(f"{text!r} is not a size such as 300MB or 8GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """``n`` bytes as a short size: ``1.5 GiB``, ``300 MiB``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def available_memory() -> tuple[int, str]:
    """``(bytes, where from)``: ``HEADLAB_MEMORY_BUDGET`` when set, else the memory the kernel says is
    available (``MemAvailable``), lowered to what the process's cgroup may still take."""
    budget = os.environ.get("HEADLAB_MEMORY_BUDGET")
    if budget:
        return parse_size(budget), "HEADLAB_MEMORY_BUDGET"
    available, source = _meminfo_available(), "available on this machine"
    cgroup = _cgroup_room()
    if cgroup is not None and cgroup < available:
        return cgroup, "left under this process's memory limit (cgroup)"
    return available, source


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_room() -> int | None:
    """What the process's cgroup (v2) may still take: its limit less what it uses, not counting the
    page cache the kernel reclaims first (``inactive_file``); None without a limit."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((base / "memory.current").read_text().strip())
        stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
        return int(limit) - (used - int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        return None


def check_need(need: Need) -> None:
    """Refuse, in one line naming the setting to lower, a run whose estimated peak memory exceeds
    what is available, or whose files exceed the free space where they go."""
    memory, source = available_memory()
    processes = started_by_torchrun()[1]  # torchrun's processes on this machine each hold a run
    needed = need.memory * processes
    if needed > memory:
        each = f" ({processes} processes of {format_bytes(need.memory)})" if processes > 1 else ""
        raise HeadlabError(f"this run needs about {format_bytes(needed)}{each} of memory at its peak (estimated from "
                           f"the model and the settings) but {format_bytes(memory)} is {source}; lower "
                           f"{need.lower}")
    for folder, size in need.disk.items():
        free = free_disk(folder)
        if size > free:
            raise HeadlabError(f"this run writes about {format_bytes(size)} into {folder} but its disk has "
                               f"{format_bytes(free)} free; free some space or choose another folder")


def free_disk(folder: str | os.PathLike) -> int:
    """Free bytes on the file system of ``folder`` (or of the nearest folder above it that exists)."""
    existing = Path(folder).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


__all__ = ["LOGITS_ABOVE_BYTES", "LOGITS_CHUNK_BYTES", "RECOMPUTE_ABOVE_BYTES", "Forward", "ModelSize", "Need",
           "available_memory", "check_need", "estimate", "format_bytes", "forward_bytes", "free_disk",
           "kept_activation_bytes", "parse_size"]
