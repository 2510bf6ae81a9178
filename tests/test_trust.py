"""Caches headlab loads code or weights from are refused when someone else could have written them:
a link, another owner, a file or folder writable by others (the native library's own checks are in
test_kernels_native.py)."""

import os

import pytest

from headlab.core.trust import UntrustedCache, check_private_tree, make_private_tree


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "headlab"
    (root / "models" / "m").mkdir(parents=True, mode=0o755)
    (root / "models" / "m" / "model.safetensors").write_bytes(b"weights")
    os.chmod(root / "models" / "m" / "model.safetensors", 0o644)
    return root


def test_a_private_cache_passes(cache):
    assert check_private_tree(cache / "models" / "m", cache) == cache / "models" / "m"


@pytest.mark.parametrize("tamper, fragment", [
    ("file_writable", "model.safetensors is writable by others"),
    ("folder_writable", "cache folder .*models is writable by others"),
    ("file_link", "model.safetensors is a link"),
    ("folder_link", "is a symbolic link or not a folder"),
    ("owner", "belongs to another user"),
])
def test_a_cache_someone_else_could_have_written_is_refused(cache, tmp_path, monkeypatch, tamper, fragment):
    target = cache / "models" / "m"
    if tamper == "file_writable":
        os.chmod(target / "model.safetensors", 0o666)
    elif tamper == "folder_writable":
        os.chmod(cache / "models", 0o777)
    elif tamper == "file_link":
        (tmp_path / "other.safetensors").write_bytes(b"other weights")
        (target / "model.safetensors").unlink()
        (target / "model.safetensors").symlink_to(tmp_path / "other.safetensors")
    elif tamper == "folder_link":
        (cache / "models").rename(tmp_path / "elsewhere")
        (cache / "models").symlink_to(tmp_path / "elsewhere")
    else:
        monkeypatch.setattr("os.getuid", lambda: 4242)
    with pytest.raises(UntrustedCache, match=fragment):
        check_private_tree(target, cache)


def test_make_private_tree_takes_write_permission_from_others(cache):
    os.chmod(cache / "models" / "m", 0o777)
    os.chmod(cache / "models" / "m" / "model.safetensors", 0o666)
    make_private_tree(cache / "models" / "m")
    check_private_tree(cache / "models" / "m", cache)
