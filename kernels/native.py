"""The CPU path's native row pass (``row_stats.c``), compiled with the system C compiler at first use.

One call per query block replaces six torch passes over the block's logits (maximum, top-k
pre-selection and selection, shift, ``exp2``, entropy product): a vector scan keeps a running
top-k per row, and one pass writes ``2^(s - max)`` in place and sums ``e · (s - max)``.

The shared library is cached under ``$HEADLAB_CACHE/native`` (default ``~/.cache/headlab``),
named by a hash of the source, compiler and flags, written atomically, and loaded only while its
content matches the sha256 recorded when headlab built it, and only from a cache only the user can
write (:mod:`headlab.core.trust`: no links, the user's, writable by nobody else), from the very file
that was checked. Without a C compiler
(``$CC``, else ``cc``/``gcc``/``clang``), or with ``HEADLAB_NATIVE=0``, :func:`row_pass` is
``None`` and the statistics fall back to torch ops (same results, slower), with one warning
when compilation was tried and failed. Triton needs the same compiler for its GPU launchers.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from headlab.core.trust import UntrustedCache, check_private_folder, open_private_file, private_folder

SOURCE = Path(__file__).with_name("row_stats.c")


class NativeUnavailable(RuntimeError):
    """The native row pass cannot be built or loaded here."""


def _cache_dir() -> Path:
    """The root of ``headlab.surgeon.models.cache_root`` (kernels import nothing else of headlab)."""
    env = os.environ.get("HEADLAB_CACHE")
    if env:
        return Path(env).expanduser() / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headlab" / "native"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise NativeUnavailable("no C compiler found (set $CC, or install gcc)")


def _flags() -> list[str]:
    """Optimise for the widest vector unit torch itself dispatches to on this CPU: 64-byte vectors
    on AVX-512 machines, 32-byte ones on AVX2 (``HEADLAB_NATIVE_VECTOR=avx2`` keeps 32-byte vectors on
    an AVX-512 machine, for comparisons)."""
    flags = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-std=gnu11"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and os.environ.get("HEADLAB_NATIVE_VECTOR", "").lower() != "avx2":
        flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-DLANES=16"]
    elif capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def build(cache_dir: Path | None = None) -> Path:
    """Compile ``row_stats.c`` (once; later calls find the cached library) and return its path.

    The library's sha256 is recorded beside it at build time (``.sha256``); a cached file is used
    only while its content matches that record, so a file dropped into the cache folder (or a
    damaged one) is rebuilt over, never loaded."""
    compiler, flags = _compiler(), _flags()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode()])).hexdigest()[:16]
    cache_dir = cache_dir or _cache_dir()
    target = cache_dir / f"row_stats-{key}.so"
    record = target.with_suffix(".sha256")
    private_folder(cache_dir)
    _check_folder(cache_dir)
    if _matches_record(target, record):
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        run = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if run.returncode:
            raise NativeUnavailable(f"{compiler} failed on {SOURCE.name}:\n{run.stderr.strip()}")
        digest = Path(tmp) / record.name
        digest.write_text(_digest(built) + "\n")
        built.chmod(0o755)  # writable by the user alone, whatever the umask (or the library is refused)
        digest.chmod(0o644)
        os.replace(digest, record)
        os.replace(built, target)
    return target


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_folder(cache_dir: Path) -> None:
    """The cache folder (and the folders above it) only the user can write: otherwise the library is
    refused (:class:`NativeUnavailable`), whatever hash is recorded beside it."""
    try:
        check_private_folder(cache_dir, cache_dir.parent)
    except UntrustedCache as err:
        raise NativeUnavailable(str(err)) from None


def _matches_record(target: Path, record: Path) -> bool:
    """Whether the cached library exists and its content is the one recorded when it was built, both
    files checked as opened (no links, the user's, writable by nobody else); a file that fails is
    rebuilt over (in a folder only the user can write), never loaded."""
    if not os.path.lexists(target) or not os.path.lexists(record):
        return False
    try:
        fd = open_private_file(target)
    except UntrustedCache:
        return False
    with os.fdopen(fd, "rb") as handle:
        return _matches_content(handle.read(), record)


def _matches_content(content: bytes, record: Path) -> bool:
    """Whether ``content`` hashes to the SHA-256 in ``record`` (opened as a private file; False when
    it is not one)."""
    try:
        fd = open_private_file(record)
    except UntrustedCache:
        return False
    with os.fdopen(fd, "rb") as handle:
        return hashlib.sha256(content).hexdigest() == handle.read().decode(errors="replace").strip()


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its one function's argument types declared: the file is opened
    once, checked (:func:`~headlab.core.trust.open_private_file`) and its hash compared with the record
    beside it, and the library is loaded from that open file, so nothing can replace it in between."""
    fd = None
    try:
        fd = open_private_file(path)
        with os.fdopen(os.dup(fd), "rb") as handle:
            content = handle.read()
        record = path.with_suffix(".sha256")
        if not _matches_content(content, record):
            raise NativeUnavailable(f"{path} is not the library recorded in {record.name}")
        opened = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path)
        lib = ctypes.CDLL(opened)  # CDLL calls release the GIL, so worker threads run in parallel
    except UntrustedCache as err:
        raise NativeUnavailable(str(err)) from None
    finally:
        if fd is not None:
            os.close(fd)
    lib.headlab_row_stats.restype = None
    lib.headlab_row_stats.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


_BUILD_LOCK = threading.Lock()  # the statistics' worker threads may ask at the same time


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("HEADLAB_NATIVE", "1") == "0":
        return None
    try:
        return load(build())
    except (NativeUnavailable, OSError) as error:
        warnings.warn(f"headlab: native CPU statistics unavailable, using torch ops (slower): {error}",
                      RuntimeWarning, stacklevel=3)
        return None


def _locked_library() -> ctypes.CDLL | None:
    with _BUILD_LOCK:
        return _library()


def available() -> bool:
    """Whether :func:`row_pass` runs natively here (builds the library on first call)."""
    return _locked_library() is not None


def row_pass(s: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """In place on fp32 CPU logits ``s [..., n]`` (contiguous, base 2, ``0 <= k <= n``): returns
    ``(row_max [...], spread [...], top_vals [..., k], top_idx [..., k])`` and leaves
    ``e = 2^(s - row_max)`` in ``s``; ``spread = Σ_j e_j (s_j - row_max)``. Top keys are sorted
    descending, ties to the earlier key. Needs :func:`available`."""
    lib = _locked_library()
    if lib is None:
        raise NativeUnavailable("the native row pass is not available here")
    if s.dtype != torch.float32 or s.device.type != "cpu" or not s.is_contiguous():
        raise ValueError("row_pass needs contiguous fp32 CPU logits")
    n = s.shape[-1]
    if n == 0 or not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and the row length {n} (>= 1), got {k}")
    lead = s.shape[:-1]
    row_max, spread = torch.empty(lead), torch.empty(lead)
    top_vals, top_idx = torch.empty(*lead, k), torch.empty(*lead, k, dtype=torch.int64)
    lib.headlab_row_stats(s.data_ptr(), s.numel() // n, n, k, row_max.data_ptr(), spread.data_ptr(),
                          top_vals.data_ptr(), top_idx.data_ptr())
    return row_max, spread, top_vals, top_idx


@functools.cache
def _libc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    The statistics free tens of MB of temporaries per layer, sizes that glibc serves from its heap
    once its adaptive mmap threshold has risen; the freed holes then stay resident between cache
    tensors that outlive them, and at 8192 tokens a SmolLM2 forward ended ~0.6 GB above SDPA's peak
    memory for free memory alone. Costs a heap walk, about a millisecond."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)

