"""The command line is generated from the settings classes: with only the required arguments, every
command's settings equal the library's defaults, and each option's help states that default."""

import argparse
import dataclasses

import pytest

from headlab.cli import build_parser
from headlab.core.settings import _shown, flag_defaults, settings_from_args


def _command_parsers(parser: argparse.ArgumentParser, prefix=()):
    """``{(command, subcommand): parser}`` of every leaf command."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return {prefix: parser}
    found = {}
    for name, sub in subparsers[0].choices.items():
        found.update(_command_parsers(sub, (*prefix, name)))
    return found


def _settings_classes(command):
    from headlab.probes.report.settings import ReportSettings
    from headlab.probes.validation.settings import ValidationSettings
    from headlab.probes.views.settings import ViewSettings
    from headlab.sae.settings import TextWindows, TrainSettings
    from headlab.sae_cli import DashboardData, EvalData, TrainData
    from headlab.surgeon.conversion.settings import ConversionSettings
    from headlab.surgeon.search.settings import CalibrationSettings
    from headlab.surgeon.search.tasks import TaskSettings

    return {
        ("report",): (ReportSettings,), ("validate",): (ValidationSettings,), ("view",): (ViewSettings,),
        ("calibrate",): (CalibrationSettings, TaskSettings), ("eval",): (TaskSettings,),
        ("convert",): (ConversionSettings,), ("sae", "train"): (TrainData, TrainSettings, TextWindows),
        ("sae", "eval"): (EvalData, TextWindows), ("sae", "dashboard"): (DashboardData, TextWindows),
    }.get(command, ())


def _minimal_argv(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the required arguments (settings fields without defaults get a
    value of their kind)."""
    argv = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            argv.append("x")
        elif action.required:
            argv += [action.option_strings[0], "1"]
    return argv


COMMANDS = sorted(_command_parsers(build_parser()))
GIVEN = {("calibrate",): ["--task", "kv-recall"], ("eval",): ["--task", "kv-recall"], ("view",): ["--text", "hi"]}


def test_the_covered_commands_are_the_commands_with_settings():
    assert {c for c in COMMANDS if _settings_classes(c)} == {
        ("report",), ("validate",), ("view",), ("calibrate",), ("eval",), ("convert",), ("sae", "train"),
        ("sae", "eval"), ("sae", "dashboard")}


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_a_commands_defaults_are_the_settings_defaults(command):
    parser = _command_parsers(build_parser())[command]
    args = parser.parse_args(_minimal_argv(parser) + GIVEN.get(command, []))
    help_text = " ".join(parser.format_help().split())
    for cls in _settings_classes(command):
        made = settings_from_args(cls, args)
        for field in dataclasses.fields(cls):
            option = field.metadata.get("option")
            if option is None or option.flag in (*GIVEN.get(command, []), *_minimal_argv(parser)):
                continue
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            assert getattr(made, field.name) == default, (command, cls.__name__, field.name)
        for flag, default in flag_defaults(cls).items():
            shown = _shown(default, None)
            if shown is not None:
                assert f"{flag} " in help_text and f"(default {shown})" in help_text, (command, flag)
