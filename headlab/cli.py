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
from contextlib import nullcontext
from pathlib import Path

from .commands.base import GROUPS, all_commands
from .commands.common import Parser
from .core.errors import HeadlabError
from .core.files import OWNED_MANIFEST
from .core.locks import output_lock
from .core.resources import check_need


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
    new_output = bool(out) and not os.path.lexists(out) and int(os.environ.get("RANK", "0")) == 0
    try:
        checked = command.check(args)
        need = command.need(args, checked)
        if need is not None:
            check_need(need)
        with _output_locked(out):
            return command.run(args, checked)
    except KeyboardInterrupt:
        print(f"\n{args.prog}: interrupted; {command.interrupted(args)}", file=sys.stderr)
        return 130
    except HeadlabError as err:
        print(f"{args.prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_FAILURES:
            raise
        print(f"{args.prog}: error: a write failed ({err.strerror}: {err.filename or out}); "
              f"{command.interrupted(args)}", file=sys.stderr)
        return 1
    finally:
        if new_output:
            _discard_if_empty(out)


# what a write that passed the checks at the start can still meet: a full disk, a quota, a file system
# remounted read-only or taken away
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def _output_locked(out):
    """The lock of the command's ``--out`` (one writer per output), or nothing without one. Under
    torchrun the first process holds it for the whole group (its ranks are one run)."""
    return output_lock(out) if out and int(os.environ.get("RANK", "0")) == 0 else nullcontext()


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
