"""The command line is generated from the registry of commands and their settings classes: with only the
required arguments, every command's settings equal the library's defaults, each option's help states
that default, and every old spelling of an option is refused in one line naming the new one."""

import argparse
import dataclasses

import pytest

from headlab.cli import build_parser, main
from headlab.commands.base import RENAMED, all_commands
from headlab.core.settings import _shown, flag_defaults, settings_from_args

COMMANDS = sorted(all_commands())
# values of required settings fields (placeholders for the rest come from their kind)
GIVEN = {"calibrate": ["--task", "kv-recall"], "eval": ["--task", "kv-recall"], "view": ["--text", "hi"],
         "sae train": ["--layers", "1"]}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of the registered command ``name`` (``"sae train"`` inside its group)."""
    parser = build_parser()
    for word in name.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _minimal_argv(name: str, parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the positional and required arguments."""
    argv = []
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._HelpAction) and action.nargs != "?":
            argv.append("x")
        elif action.required and action.option_strings[0] not in GIVEN.get(name, []):
            argv += [action.option_strings[0], "1"]
    return argv + GIVEN.get(name, [])


@pytest.mark.parametrize("name", COMMANDS)
def test_a_commands_defaults_are_the_settings_defaults(name):
    command, parser = all_commands()[name], command_parser(name)
    argv = _minimal_argv(name, parser)
    args = parser.parse_args(argv)
    help_text = " ".join(parser.format_help().split())
    for cls in command.settings:
        made = settings_from_args(cls, args)
        for field in dataclasses.fields(cls):
            option = field.metadata.get("option")
            if option is None or (option.flag and option.flag in argv):
                continue
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            assert getattr(made, field.name) == default, (name, cls.__name__, field.name)
        for flag, default in flag_defaults(cls).items():
            shown = _shown(default, None)
            if shown is not None and flag not in argv:
                assert f"{flag} " in help_text and f"(default {shown})" in help_text, (name, flag)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_commands_description_states_what_its_work_costs(name):
    command = all_commands()[name]
    if command.model != "none":
        assert "Cost" in command.description or "cost" in command.description, name


@pytest.mark.parametrize("name", COMMANDS)
def test_an_old_spelling_is_refused_in_one_line_naming_the_new_one(name, capsys):
    command, parser = all_commands()[name], command_parser(name)
    known = set(parser._option_string_actions)
    renamed = {old: new for old, new in {**RENAMED, **command.renamed}.items() if new in known}
    for old, new in renamed.items():
        with pytest.raises(SystemExit) as exited:
            main([*name.split(), *_minimal_argv(name, parser), old, "1"])
        error = capsys.readouterr().err.strip()
        assert exited.value.code == 2 and "\n" not in error and f"{old} is spelled {new} now" in error, (name, old)


def test_the_old_spellings_reach_the_commands_that_had_them():
    spelled = {name: {old for old in {**RENAMED, **all_commands()[name].renamed}
                      if old in command_parser(name)._option_string_actions} for name in COMMANDS}
    assert {"--samples", "--scores"} <= spelled["report"]
    assert {"--random-seed", "--samples"} <= spelled["validate"]
    assert {"--layer", "--context", "--batch-size", "--eval-windows"} <= spelled["sae train"]
    assert {"--seq-len", "--eval-windows"} <= spelled["convert"]
    assert "--file" in spelled["view"]
