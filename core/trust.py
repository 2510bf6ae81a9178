"""Caches headlab loads code or weights from: only what the user alone can have written.

The rule is the one ``sshd`` applies to ``~/.ssh``: a cached file and the folders above it are
refused when they are symbolic links, owned by another user (folders may also belong to root), or
writable by others (folders with the sticky bit excepted, such as ``/tmp``; group write is allowed
where the group is the user's own private group, as under umask 002 on Debian and Fedora). Anyone
who passes it could as well have changed headlab itself; the hashes recorded beside cached files
detect damage. headlab creates its cache folders private (:func:`private_folder`).
"""

from __future__ import annotations

import grp
import os
import pwd
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
    for path in root.parents:  # the folders above: a link among them must be root's or the user's too
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid not in (os.getuid(), 0):
                raise UntrustedCache(f"{path} is a symbolic link of another user (uid {info.st_uid})")
            info = os.stat(path)
        _check_owner_and_mode(path, info, (os.getuid(), 0), sticky_ok=True)
    return folder


def private_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and any missing folder above it writable by the user alone (0700, whatever
    the umask); folders that exist are left as they are. Returns ``folder``."""
    folder = Path(folder)
    missing = [path for path in [folder, *folder.parents] if not path.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
    return folder


def _check_owner_and_mode(path: Path, info: os.stat_result, owners: tuple[int, ...], sticky_ok: bool) -> None:
    if info.st_uid not in owners:
        raise UntrustedCache(f"cache folder {path} belongs to another user (uid {info.st_uid})")
    if sticky_ok and info.st_mode & stat.S_ISVTX:  # others may add entries, never replace ours
        return
    if _writable_by_others(info):
        raise UntrustedCache(f"cache folder {path} is writable by others (mode {stat.filemode(info.st_mode)}); "
                             "run chmod go-w on it")


def _entry_problem(info: os.stat_result, folder_ok: bool = False) -> str | None:
    """What makes a cached file (or, with ``folder_ok``, folder) untrusted, or None: not a regular
    file (a link, a pipe), another user's, or writable by others."""
    if not (stat.S_ISREG(info.st_mode) or (folder_ok and stat.S_ISDIR(info.st_mode))):
        return "is a link or not a regular file"
    if info.st_uid != os.getuid():
        return f"belongs to another user (uid {info.st_uid})"
    if _writable_by_others(info):
        return f"is writable by others (mode {stat.filemode(info.st_mode)}); run chmod go-w on it"
    return None


def _writable_by_others(info: os.stat_result) -> bool:
    """Writable by others than the user (group write allowed where the group is the user's own)."""
    return bool(info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and not _private_group(info.st_gid)))


def _private_group(gid: int) -> bool:
    """Whether ``gid`` is the user's own group: their primary group, with no other member."""
    try:
        members = grp.getgrgid(gid).gr_mem
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return False
    return gid == os.getgid() and gid != 0 and set(members) <= {user}


def check_private_tree(folder: str | os.PathLike, root: str | os.PathLike) -> Path:
    """:func:`check_private_folder`, and every entry of ``folder`` (and its subfolders) a regular file
    or folder, no link, the user's and writable by nobody else. Returns ``folder``."""
    folder = check_private_folder(folder, root)
    for base, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(base) / name
            problem = _entry_problem(os.lstat(path), folder_ok=True)
            if problem:
                raise UntrustedCache(f"cached entry {path} {problem}")
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
    problem = _entry_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise UntrustedCache(f"cached file {path} {problem}")
    return fd


__all__ = ["UntrustedCache", "check_private_folder", "check_private_tree", "make_private_tree", "open_private_file",
           "private_folder"]
