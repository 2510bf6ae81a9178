"""One writer per output: a lock file beside the output path, held by the running command.

The lock is an advisory ``flock`` on ``<parent>/.<name>.headlab-lock``: the kernel releases it when
the process ends in any way (Ctrl-C, an error, SIGKILL), so a lock is never stuck. The file records
the holder's process id and start time for the message a second writer gets; a file left behind by a
process that ended without removing it is taken over with a note.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError

LOCK_SUFFIX = ".headlab-lock"


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of ``output`` (a file or a folder): beside it, hidden, in its parent folder
    with links resolved (so two spellings of one output share one lock)."""
    output = Path(output).expanduser().absolute()
    return output.parent.resolve() / f".{output.name}{LOCK_SUFFIX}"


@contextmanager
def output_lock(output: str | os.PathLike, command: str = "headlab") -> Iterator[Path]:
    """Hold the lock of ``output`` for the block; :class:`OutputError` (one line) when another
    process holds it. The lock file is removed when the block ends."""
    try:
        Path(output).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the folder of {output} ({err.strerror})") from None
    path = lock_path(output)
    handle = _acquire(path, output)
    try:
        yield path
    finally:
        try:
            if _same_file(handle.fileno(), path):  # never another run's lock file
                path.unlink()
        except OSError:
            pass
        handle.close()  # releases the flock


def _acquire(path: Path, output) -> "object":
    """An open handle on ``path`` holding its exclusive flock; retried when the file was replaced
    between opening and locking (its last holder removed it)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            raise OutputError(f"cannot lock {output} ({err.strerror}: {path})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a pipe or a device there: reading it could block
            os.close(fd)
            raise OutputError(f"cannot lock {output}: {path} is not a regular file; remove it")
        handle = os.fdopen(fd, "r+", encoding="utf-8")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise OutputError(f"another headlab run{holder} is writing {output}; wait for it to end or choose "
                              "another --out") from None
        except OSError as err:  # a file system without locks (some network mounts)
            handle.close()
            raise OutputError(f"cannot lock {output} ({err.strerror}); write it on a local disk") from None
        if _same_file(fd, path):
            break
        handle.close()
    left = _holder(handle)
    if left:
        warnings.warn(f"headlab: took over the lock of {output} left by a run{left} that has ended", stacklevel=3)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    return handle


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(handle) -> str:
    """`` (process N, started T)`` from a lock file's record, or ``""`` when it holds none."""
    try:
        handle.seek(0)
        record = json.loads(handle.read(4096) or "{}")
        return f" (process {int(record['pid'])}, started {record['started']})"
    except (ValueError, KeyError, TypeError, OSError):
        return ""


__all__ = ["LOCK_SUFFIX", "lock_path", "output_lock"]
