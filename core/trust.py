"""Caches headlab loads code or weights from: only what the user alone can have written.

The rule is the one ``sshd`` applies to ``~/.ssh``: a cached file and the folders above it are
refused when they are symbolic links, owned by another user (folders may also belong to root), or
writable by others (folders with the sticky bit excepted, such as ``/tmp``). Anyone who passes it
could as well have changed headlab itself; the hashes recorded beside cached files detect damage.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import HeadlabError


class UntrustedCache(HeadlabError):
    """A cached file or folder someone other than the user could have written."""


def check_private_folder(folder: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Refuse ``folder`` unless it and every folder from ``root`` down to it are real folders (no
    links) the user owns, writable by nobody else, and every folder above ``root`` belongs to the
    user or root and is writable by nobody else unless sticky. Returns ``folder``."""
    folder, root = Path(folder).absolute(), Path(root).absolute()
    if folder != root and root not in folder.parents:
        raise ValueError(f"{folder} is not inside {root}")
    own = [folder, *[path for path in folder.parents if path == root or root in path.parents]]
    for path in own:  # headlab's own folders: as written, no link anywhere
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise UntrustedCache(f"cache folder {path} is a symbolic link or not a folder")
        _check_owner_and_mode(path, info, (os.getuid(),), sticky_ok=False)
    for path in root.resolve().parents:  # the folders above, links followed
        _check_owner_and_mode(path, os.stat(path), (os.getuid(), 0), sticky_ok=True)
    return folder


def _check_owner_and_mode(path: Path, info: os.stat_result, owners: tuple[int, ...], sticky_ok: bool) -> None:
    if info.st_uid not in owners:
        raise UntrustedCache(f"cache folder {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (sticky_ok and info.st_mode & stat.S_ISVTX):
        raise UntrustedCache(f"cache folder {path} is writable by others (mode {stat.filemode(info.st_mode)}); "
                             "run chmod go-w on it")


def check_private_tree(folder: str | os.PathLike, root: str | os.PathLike) -> Path:
    """:func:`check_private_folder`, and every entry of ``folder`` (and its subfolders) a regular file
    or folder, no link, the user's and writable by nobody else. Returns ``folder``."""
    folder = check_private_folder(folder, root)
    for base, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(base) / name
            info = os.lstat(path)
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise UntrustedCache(f"cached entry {path} is a link or not a regular file")
            if info.st_uid != os.getuid():
                raise UntrustedCache(f"cached entry {path} belongs to another user (uid {info.st_uid})")
            if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise UntrustedCache(f"cached entry {path} is writable by others; run chmod go-w on it")
    return folder


def make_private_tree(folder: str | os.PathLike) -> None:
    """Take write permission for group and others from ``folder`` and everything in it (a cache
    written under a umask such as 002 passes :func:`check_private_tree`)."""
    for base, folders, files in os.walk(folder):
        for path in [Path(base), *(Path(base) / name for name in folders + files)]:
            info = os.lstat(path)
            if not stat.S_ISLNK(info.st_mode):
                os.chmod(path, stat.S_IMODE(info.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


def open_private_file(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path`` after checking the open file itself (not a path that may
    change meanwhile): a regular file, not a link, owned by the user, writable by nobody else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise UntrustedCache(f"cached file {path} cannot be opened safely ({err.strerror})") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.getuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by others (mode {stat.filemode(info.st_mode)})"
    if problem:
        os.close(fd)
        raise UntrustedCache(f"cached file {path} {problem}")
    return fd


__all__ = ["UntrustedCache", "check_private_folder", "check_private_tree", "make_private_tree", "open_private_file"]
