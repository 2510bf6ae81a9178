"""The native row pass of the CPU statistics (kernels/row_stats.c) against float64 torch, and its
build: cached, and a failed build falls back to torch ops with a warning."""

import os
import subprocess
import sys

import pytest
import torch

from headlab.kernels import native

pytestmark = pytest.mark.numerics  # run again in CI with one thread and narrower vector units

HIDDEN = torch.finfo(torch.float32).min


def expected(s: torch.Tensor, k: int):
    """float64 ``(row_max, e, spread, top values, top indices)``; ties go to the earlier key."""
    x = s.double()
    row_max = x.amax(-1)
    shifted = x - row_max[..., None]
    e = torch.exp2(shifted)
    spread = (e * shifted).nan_to_num().sum(-1)  # hidden keys: 0 · (-3.4e38)
    top = torch.sort(-x, dim=-1, stable=True)  # stable: equal values stay in key order
    return row_max, e, spread, -top.values[..., :k], top.indices[..., :k]


@pytest.mark.parametrize("n,k", [(n, k) for n in (1, 7, 8, 63, 64, 65, 130, 1000) for k in (0, 1, 3, 8) if k <= n])
def test_row_pass_matches_float64(n, k):
    gen = torch.Generator().manual_seed(n * 10 + k)
    s = torch.randn(4, 3, n, generator=gen) * 4
    s[0, 0, n // 2 :] = HIDDEN  # a causal-style hidden tail
    s[1, 1, ::3] = HIDDEN  # padding inside the row
    s[2, 2, : max(1, n // 4)] = 1.5  # ties at the top: earlier keys first
    if n > 64:
        s[3, 0, 64:] = s[3, 0, :64].max() + torch.rand(n - 64, generator=gen)  # rising row
    row_max, e, spread, top_vals, top_idx = expected(s, k)
    work = s.clone()
    got_max, got_spread, got_vals, got_idx = native.row_pass(work, k)
    assert torch.equal(got_max.double(), row_max)
    assert torch.allclose(work.double(), e, rtol=2e-6, atol=1e-30)
    seen = (s > HIDDEN).any(-1, keepdim=True)  # rows with a visible key (the op clears the others)
    assert (work[(s == HIDDEN) & seen] == 0).all(), "hidden keys must weigh exactly 0"
    assert torch.allclose(got_spread.double(), spread, rtol=1e-5, atol=1e-5)
    assert got_vals.shape == (4, 3, k) and got_idx.dtype == torch.int64
    assert torch.equal(got_vals.double(), top_vals)
    assert torch.equal(got_idx, top_idx)


def test_exp2_is_accurate_over_its_whole_range():
    x = torch.linspace(-126, 0, 2_000_001)
    work = x.clone()
    native.row_pass(work, 0)  # the maximum is 0, so e = 2^x
    ref = torch.exp2(x.double())
    assert ((work.double() - ref).abs() / ref).max() < 2e-7
    below = torch.tensor([-127.0, -200.0, -1e30, HIDDEN, 0.0])
    native.row_pass(below, 0)
    assert below[:4].eq(0).all() and below[4] == 1


def test_row_pass_rejects_bad_input():
    with pytest.raises(ValueError, match="between 0 and the row length"):
        native.row_pass(torch.zeros(2, 5), 6)
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.row_pass(torch.zeros(5, 2).t(), 1)
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.row_pass(torch.zeros(2, 5, dtype=torch.float16), 1)


def test_build_is_cached_by_source_and_flags(tmp_path):
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    record = first.with_suffix(".sha256")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, record.name]), "no temporary files left"


def test_a_file_dropped_into_the_cache_is_rebuilt_over_not_loaded(tmp_path):
    """A library whose content does not match the hash recorded at build time (replaced, damaged,
    or without a record) is never handed to the loader: it is compiled again over it."""
    built = native.build(tmp_path)
    good = built.read_bytes()
    for tamper in ("replace", "unrecorded"):
        dropped = tmp_path / "dropped"
        dropped.write_bytes(b"\x7fELF dropped by someone else" + bytes(64))
        dropped.replace(built)
        if tamper == "unrecorded":
            built.with_suffix(".sha256").unlink()
        again = native.build(tmp_path)
        assert again == built and again.read_bytes() == good, tamper
    native.load(built)  # the rebuilt library loads


@pytest.mark.parametrize("tamper", ["folder_writable_by_others", "another_owner"])
def test_a_cache_folder_someone_else_could_write_is_refused_whatever_its_record(tmp_path, monkeypatch, tamper):
    """Replacing the library together with its recorded hash needs write access to the cache: a cache
    folder writable by others, or owned by another user, is refused outright."""
    cache = tmp_path / "native"
    native.build(cache)
    if tamper == "folder_writable_by_others":
        cache.chmod(0o777)
    else:
        monkeypatch.setattr("os.getuid", lambda: 4242)
    fragment = {"folder_writable_by_others": "writable by others", "another_owner": "belongs to another user"}[tamper]
    with pytest.raises(native.NativeUnavailable, match=fragment):
        native.build(cache)


@pytest.mark.parametrize("tamper", ["writable_by_others", "symlink"])
def test_a_library_file_someone_else_could_have_written_is_rebuilt_over_never_loaded(tmp_path, tamper):
    cache = tmp_path / "native"
    built = native.build(cache)
    good = built.read_bytes()
    elsewhere = tmp_path / "elsewhere.so"
    if tamper == "writable_by_others":
        built.chmod(0o666)
    else:
        built.replace(elsewhere)
        built.symlink_to(elsewhere)  # its record still matches the content it points to
    with pytest.raises(native.NativeUnavailable):
        native.load(built)  # never loaded as it is
    again = native.build(cache)
    assert again == built and not again.is_symlink() and again.read_bytes() == good
    assert oct(again.stat().st_mode & 0o777) == oct(0o755)
    native.load(again)


def test_cache_folders_are_created_private_whatever_the_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        native.build(tmp_path / "headlab" / "native")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "headlab", tmp_path / "headlab" / "native"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


def test_a_failed_build_falls_back_to_torch_ops_with_a_warning(tmp_path, monkeypatch):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: simulated failure' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native.NativeUnavailable, match="simulated failure"):
        native.build()
    native._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="using torch ops"):
            assert not native.available()
        with pytest.raises(native.NativeUnavailable):
            native.row_pass(torch.zeros(1, 4), 1)
    finally:
        native._library.cache_clear()
    monkeypatch.undo()
    assert native.available()


FRAGMENTED_HEAP = """
import torch
from headlab.kernels import native
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
big = torch.ones(5 * 2**20); del big  # freeing a 20 MB mmapped chunk raises glibc's mmap threshold
keep, drop = [], []
for i in range(60):
    (keep if i % 2 else drop).append(torch.ones(2**20))  # 4 MB each, now served from the heap
drop.clear()  # 120 MB of holes between live tensors: free, but resident
freed = rss_mib()
native.release_free_memory()
print(freed - rss_mib())
"""


@pytest.mark.skipif(native._libc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_release_free_memory_returns_heap_holes_to_the_os():
    done = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    assert float(done.stdout) > 100, "the freed 120 MB should leave the resident set"
