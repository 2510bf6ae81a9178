"""The ``headlab`` command line: one command with subcommands, built from the registry of commands
(:mod:`headlab.commands`).

Every command checks its arguments (through the settings classes that define them for the library too),
its input files and its outputs before it loads a model; bad input ends in one line and exit status 2,
Ctrl-C in one line saying what was kept and exit status 130. Importing this module costs no torch, so
``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from .commands.base import GROUPS, all_commands
from .commands.common import Parser
from .core.distributed import first_process
from .core.errors import HeadlabError
from .core.files import OWNED_MANIFEST
from .core.locks import output_lock
from .core import resources


def build_parser() -> Parser:
    """The parser of every registered command (groups such as ``sae`` hold their own)."""
    parser = Parser(prog="headlab", description="Surgery on, and interpretation of, the attention heads of "
                                                "pretrained transformers.")
    sub = parser.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    groups = {}
    for name, command in all_commands().items():
        group, _, leaf = name.rpartition(" ")
        target = sub
        if group:
            if group not in groups:
                help_line, description = GROUPS[group]
                group_parser = sub.add_parser(group, help=help_line, description=description)
                groups[group] = group_parser.add_subparsers(dest=f"{group}_command", required=True, metavar="COMMAND")
            target = groups[group]
        subparser = target.add_parser(leaf, help=command.help, description=command.description)
        command().add_to(subparser)
        subparser.set_defaults(command=command(), prog=subparser.prog)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``headlab`` command."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _headlab_warnings_in_one_line(warnings.formatwarning)
    command = args.command
    out = getattr(args, "out", None)
    try:
        checked = command.check(args)
        need = command.need(args, checked)
        if need is not None:
            resources.check_need(need)
        with _output_locked(out) as locked:
            new_output = locked and not os.path.lexists(out)
            try:
                return command.run(args, checked)
            finally:
                if new_output:
                    _discard_if_empty(out)
    except KeyboardInterrupt:
        print(f"\n{args.prog}: interrupted; {command.interrupted(args)}", file=sys.stderr)
        return 130
    except HeadlabError as err:
        print(f"{args.prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        reason = _write_failure(err, out)
        if reason is None:
            raise
        print(f"{args.prog}: error: a write failed ({reason}); {command.interrupted(args)}", file=sys.stderr)
        return 1


# what a write that passed the checks at the start can still meet: a full disk, a quota, a file system
# remounted read-only
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
FULL_BELOW_BYTES = 64 * 2**20  # free bytes under which a failed write is put down to a full disk


def _write_failure(err: Exception, out) -> str | None:
    """Why ``err`` is a write that failed on a full or read-only file system, or None when it is not
    one. safetensors and ``torch.save`` report a full disk in errors of their own, so any error is
    one when the output's file system has (almost) no space left."""
    if isinstance(err, OSError) and err.errno in WRITE_FAILURES:
        return f"{err.strerror}: {err.filename or out}"
    try:
        free = resources.free_disk(out) if out else None
    except OSError:
        free = None
    if free is not None and free < FULL_BELOW_BYTES:
        return f"{type(err).__name__} with {free // 2**20} MiB left on the disk of {out}"
    return None


@contextmanager
def _output_locked(out):
    """Hold the lock of the command's ``--out`` (one writer per output); yields whether this process
    holds it. Under torchrun the first process holds it for the whole group (its ranks are one run)."""
    if not out or not first_process():
        yield False
        return
    with output_lock(out):
        yield True


def _discard_if_empty(out) -> None:
    """Remove an output folder this run created when it holds nothing but headlab's ownership record
    (a run that failed before its first result leaves no folder behind)."""
    folder = Path(out)
    if folder.is_dir() and not folder.is_symlink() and {e.name for e in folder.iterdir()} <= {OWNED_MANIFEST}:
        shutil.rmtree(folder, ignore_errors=True)


def _headlab_warnings_in_one_line(format_warning):
    """A ``warnings.formatwarning`` that prints headlab's own warnings (``"headlab: ..."``) as their
    line alone, and others as ``format_warning`` does."""
    if getattr(format_warning, "headlab", False):
        return format_warning

    def formatted(message, category, filename, lineno, line=None):
        if str(message).startswith("headlab: "):
            return f"{message}\n"
        return format_warning(message, category, filename, lineno, line)

    formatted.headlab = True
    return formatted


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
