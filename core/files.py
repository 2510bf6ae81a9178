"""Atomic file and directory writes: a temp file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputFileError, OutputError


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp (and safetensors) make 0600: the usual permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``os.umask`` sets it
    for every thread until it is set back)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_modes(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the permissions the user's umask gives new files and
    folders (tools such as safetensors write 0600 whatever the umask)."""
    mask = _umask()
    for base, folders, files in os.walk(folder):
        os.chmod(base, 0o777 & ~mask)
        for name in files:
            path = os.path.join(base, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


MAX_READ_BYTES = 256 * 2**20  # the largest file headlab reads whole (text, JSON): more is refused


def check_size(path: str | os.PathLike, where: str, max_bytes: int = MAX_READ_BYTES) -> None:
    """Refuse (:class:`InputFileError`, one line naming ``where``) a file larger than ``max_bytes``."""
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise InputFileError(f"{where} is {size / 2**20:.0f} MiB, more than the {max_bytes // 2**20} MiB headlab reads")


def read_text_file(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_READ_BYTES) -> str:
    """The UTF-8 text of ``path``; :class:`InputFileError` (one line) when it is missing, a folder,
    not a regular file (a pipe or a device would block or never end), larger than ``max_bytes``,
    unreadable or not UTF-8."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir() and not path.is_file():
            raise InputFileError(f"{what} {path} is not a regular file")
        if path.is_file():
            check_size(path, f"{what} {path}", max_bytes)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputFileError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as err:
        raise InputFileError(f"{what} {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise InputFileError(f"{what} {path} cannot be read ({err.strerror})") from None


def parse_json(text: str | bytes, where: str):
    """The parsed JSON ``text`` of ``where`` (a file named in messages); :class:`InputFileError` (one
    line) when it is not JSON or an object gives a key twice (JSON readers differ on which one wins:
    headlab reads neither)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{where} is not JSON ({err.msg}, line {err.lineno})") from None
    except RecursionError:
        raise InputFileError(f"{where} nests its JSON too deeply to read") from None
    except _DuplicateKey as err:
        raise InputFileError(f"{where} gives the key {err.args[0]!r} twice in one object") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return data


def read_json_file(path: str | os.PathLike, what: str = "JSON file", fmt: str | None = None):
    """The parsed JSON of ``path`` (:func:`parse_json`); :class:`InputFileError` (one line) when it
    cannot be read, is not JSON, or (given ``fmt``) is not an object whose ``"format"`` is ``fmt``."""
    data = parse_json(read_text_file(path, what), f"{what} {path}")
    if fmt is not None and (not isinstance(data, dict) or data.get("format") != fmt):
        raise InputFileError(f"{path} is not a {what} of this headlab (format {fmt}); move it away or write it again")
    return data


def read_jsonl(path: str | os.PathLike, what: str = "JSON-lines file") -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for each non-blank line of a JSON-lines file; a line that is
    not JSON raises :class:`InputFileError` naming the file and line."""
    for number, line in enumerate(read_text_file(path, what).splitlines(), 1):
        if line.strip():
            yield number, parse_json(line, f"{path}:{number}")


def write_json(target: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON to ``target`` atomically."""
    return write_text(target, json.dumps(data, indent=2, allow_nan=False) + "\n")


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; move it into place if the block succeeds.

    If ``target`` appears meanwhile (another process finished first), the new copy is discarded
    and the existing one is kept: a directory written this way is never half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        usual_modes(tmp)  # mkdtemp makes 0700, safetensors 0600: the usual permissions
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- what headlab may overwrite ------------------------------------------------------------------

OWNED_MANIFEST = ".headlab-owned.json"  # in each output folder: the entries headlab wrote there
GENERATOR_META = '<meta name="generator" content="headlab">'  # in every page headlab writes


def headlab_wrote(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is one headlab wrote, by its content: a JSON object whose
    ``format`` starts with ``headlab``, or a page carrying headlab's generator tag."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > MAX_READ_BYTES:
            return False
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    if GENERATOR_META.encode() in head:
        return True
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return False
        return isinstance(data, dict) and str(data.get("format", "")).startswith("headlab")
    return False


def claim_file(path: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """Check, before any work and creating nothing (a probe file is made and removed), that ``path``
    may be written: a new
    file where a folder can be created and written, or a file headlab wrote (:func:`headlab_wrote`);
    with ``overwrite`` any file. Raises :class:`OutputError` with the reason."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not overwrite and not headlab_wrote(path):
        raise OutputError(f"{what} {path} exists and headlab did not write it; choose another path or pass --overwrite")
    _check_writable(path.parent, what)
    return path


def check_folder(path: str | os.PathLike, overwrite: bool = False, what: str = "output folder") -> Path:
    """Check, before any work and creating nothing (a probe file is made and removed), that headlab
    may write into the
    folder ``path``: it is new, empty, or holds only entries headlab wrote (:data:`OWNED_MANIFEST`);
    with ``overwrite`` it may hold anything. Raises :class:`OutputError` with the reason."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file; give a folder")
    if path.is_dir() and not overwrite:
        owned = owned_entries(path)
        foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in owned | {OWNED_MANIFEST})
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise OutputError(f"{what} {path} holds files headlab did not write ({shown}); choose a new or empty "
                              "folder, or pass --overwrite")
    _check_writable(path, what)
    return path


def claim_folder(path: str | os.PathLike, names: Iterable[str], overwrite: bool = False,
                 what: str = "output folder") -> Path:
    """:func:`check_folder`, then create the folder and record the entries ``names`` as headlab's
    (entries outside ``names`` are never touched). Called where the writing starts."""
    path = check_folder(path, overwrite, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the {what} {path} ({err.strerror})") from None
    record_owned(path, names)
    return path


def record_owned(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add ``names`` to the entries headlab owns in ``folder`` (:data:`OWNED_MANIFEST`)."""
    folder = Path(folder)
    entries = sorted(owned_entries(folder) | set(names))
    write_json(folder / OWNED_MANIFEST, {"format": "headlab-owned/1", "entries": entries})


def owned_entries(folder: str | os.PathLike) -> set[str]:
    """The entries of ``folder`` headlab recorded as its own (:data:`OWNED_MANIFEST`)."""
    folder = Path(folder)
    manifest = folder / OWNED_MANIFEST
    if not manifest.is_file():
        return set()
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return set(data["entries"]) if data.get("format") == "headlab-owned/1" else set()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return set()


def _check_writable(folder: Path, what: str) -> None:
    """``folder``, or the nearest folder above it that exists, takes new files (tried with a
    temporary file that is removed at once)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write the {what}: {existing} is a file, not a folder")
    try:  # a real file, created and removed at once: permissions alone say nothing for root, /proc or /sys
        with tempfile.TemporaryFile(dir=existing, prefix=".headlab-probe-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write the {what} into {existing} ({err.strerror})") from None
