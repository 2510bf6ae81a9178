"""What a command is, and the registry the command line is built from.

A command is one class in one module of this package, registered with :func:`register_command`: its name
(``"report"``, or ``"sae train"`` inside the ``sae`` group), a help line, a description (what it does and
writes, and what it costs at its defaults on two CPU cores), whether it takes a model and writes to
``--out``, the settings classes whose fields are its options, and any other arguments. ``check`` does
everything that can fail before a model loads (arguments, input files, outputs, the model's config, which
costs no weights) and returns what ``run`` needs; ``run`` calls library functions; ``interrupted`` says
what Ctrl-C kept. :func:`headlab.cli.build_parser` loops over the registry, so adding a command is one
module. Importing this module costs no torch.
"""

from __future__ import annotations

import argparse
from importlib import import_module
from typing import Any, ClassVar

from ..core.settings import add_options
from . import common

# the built-in commands, one module each, in the order `headlab --help` lists them
BUILTIN = ("models", "report", "view", "atlas", "validate", "calibrate", "eval", "apply", "stream_plan",
           "stream_eval", "train_gates", "convert", "sae_train", "sae_eval", "sae_dashboard")
GROUPS = {"sae": ("sparse autoencoders on per-head attention outputs (train, eval, dashboard)",
                  "Sparse autoencoders on the per-head outputs of one layer (the input of o_proj, heads flattened; "
                  "TransformerLens blocks.L.attn.hook_z).")}
# old spellings of options: each is refused in one line naming the new one (in every command that lacks it)
RENAMED = {"--samples": "--windows", "--context": "--tokens", "--seq-len": "--tokens", "--eval-windows": "--windows",
           "--random-seed": "--seed", "--layer": "--layers", "--file": "--text-file"}


class Command:
    """Base of every command (see the module docstring)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    description: ClassVar[str] = ""
    model: ClassVar[str] = "positional"  # "positional": MODEL; "option": --model MODEL; "none"
    max_memory: ClassVar[bool] = True  # with a model: --max-memory (layers beyond it read from disk)
    output: ClassVar[str | None] = None  # the help of --out (required), or None for no --out
    settings: ClassVar[tuple[type, ...]] = ()
    renamed: ClassVar[dict[str, str]] = {}  # old spellings of this command's own options
    # a small run (about a minute on SmolLM2-135M on two CPU cores): its arguments after the name, with
    # {model}, {out}, {scores} (a report's scores.json), {plan}, {sae} (a saved autoencoder's folder) and
    # {text} (a text file) to fill in; the contract tests run it on tiny models of several families
    example: ClassVar[str] = ""

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        """Arguments beyond the model, ``--out`` and the settings' options."""

    def check(self, args: argparse.Namespace) -> Any:
        """Everything that can fail before a model loads; raises :class:`~headlab.core.errors.HeadlabError`.
        Returns what :meth:`run` needs."""
        return None

    def need(self, args: argparse.Namespace, checked: Any):
        """The run's estimated peak memory and the bytes it writes (a
        :class:`~headlab.core.resources.Need`), checked against the machine after :meth:`check` and
        before :meth:`run`; None for a command that loads no model."""
        return None

    def run(self, args: argparse.Namespace, checked: Any) -> int:
        """Do the work (library calls) and return the exit status."""
        raise NotImplementedError(f"command {self.name!r} has no run")

    def interrupted(self, args: argparse.Namespace) -> str:
        """What Ctrl-C kept, and how to resume."""
        return "nothing was written"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """The command's arguments on its parser: model, ``--out``, settings, its own, old spellings."""
        if self.model != "none":
            common.add_model_arguments(parser, self.model == "positional", self.max_memory)
        if self.output is not None:
            common.add_output_arguments(parser, self.output)
        for cls in self.settings:
            add_options(parser, cls)
        self.arguments(parser)
        known = set(parser._option_string_actions)
        for old, new in {**RENAMED, **self.renamed}.items():
            if old not in known and new in known:
                parser.add_argument(old, action=common.Renamed, new=new, nargs="?", help=argparse.SUPPRESS)


COMMANDS: dict[str, type[Command]] = {}


def register_command(cls: type[Command]) -> type[Command]:
    """Class decorator: make ``cls`` a ``headlab`` command under ``cls.name``."""
    group, _, leaf = cls.name.rpartition(" ")
    if not leaf or (group and group not in GROUPS):
        raise ValueError(f"command name {cls.name!r}: one word, or a group of {sorted(GROUPS)} and one word")
    if cls.name in COMMANDS and COMMANDS[cls.name] is not cls:
        raise ValueError(f"command {cls.name!r} is registered already (by {COMMANDS[cls.name].__qualname__})")
    if cls.model not in ("positional", "option", "none"):
        raise ValueError(f"command {cls.name!r}: model must be 'positional', 'option' or 'none'")
    COMMANDS[cls.name] = cls
    return cls


def all_commands() -> dict[str, type[Command]]:
    """Every registered command, the built-in ones loaded first (in their order)."""
    for module in BUILTIN:
        import_module(f".{module}", __package__)
    return COMMANDS


__all__ = ["BUILTIN", "COMMANDS", "Command", "GROUPS", "RENAMED", "all_commands", "register_command"]
