"""Settings with one definition for the library and the command line.

A settings class is a dataclass whose fields are made with :func:`setting`: a default, a help
text, a :class:`~.kinds.Kind` that checks a value (:mod:`.kinds`) and, for fields the command line
offers, the option's flag. The class checks every field when it is built
(:func:`check_settings`, from ``__post_init__``), so a bad value fails with one line in the
Python API and on the command line alike; :func:`add_options` generates the argparse options
from the same fields, so the library's defaults are the command line's. Nested settings (a field
whose default is another settings class) contribute their own options.

Importing this module costs nothing (no torch): argument errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

from .errors import HeadlabError, InputFileError
from .kinds import Kind, Switch

_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Option:
    """A setting's metadata: help, kind and (when the command line offers it) the flag."""

    help: str | Callable[[], str]  # a function when the text lists what a registry holds at the time
    kind: Kind
    flag: str | None = None
    repeat: bool = False  # the flag may be given several times; its lists are joined

    @property
    def text(self) -> str:
        """The help text."""
        return self.help() if callable(self.help) else self.help


def setting(default=_MISSING, help: str | Callable[[], str] = "", *, kind: Kind | None = None, flag: str | None = None,
            repeat: bool = False, default_factory: Callable[[], Any] | None = None):
    """A dataclass field carrying an :class:`Option` (``kind`` checks its values; ``flag`` offers it
    on the command line, ``repeat`` lets an :class:`~.kinds.Items` flag be given several times)."""
    metadata = {"option": Option(help, kind or Kind(), flag, repeat)}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_settings(settings, error: type[HeadlabError] = HeadlabError) -> None:
    """Check and normalise every field of a settings dataclass in place; raises ``error`` (a
    :class:`HeadlabError`) naming the field (and its flag) and what would be valid."""
    for field in dataclasses.fields(settings):
        option = field.metadata.get("option")
        if option is None:
            continue
        value = getattr(settings, field.name)
        try:
            checked = option.kind.check(value)
        except ValueError as err:
            where = f" ({option.flag})" if option.flag else ""
            raise error(f"{type(settings).__name__}.{field.name}{where}: {err}") from None
        object.__setattr__(settings, field.name, checked)


def from_dict(cls, data: dict, source: str, defaults=None):
    """``cls(**data)`` from a JSON object, refusing unknown keys and naming ``source`` in errors;
    fields ``data`` lacks keep the values of ``defaults`` (an instance of ``cls``) when given."""
    if not isinstance(data, dict):
        raise HeadlabError(f"{source}: expected a JSON object of {cls.__name__} fields, got {type(data).__name__}")
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise HeadlabError(f"{source}: unknown field(s) {unknown}; {cls.__name__} has {sorted(names)}")
    values = {}
    for field in dataclasses.fields(cls):
        default = _default(field, defaults)
        if field.name in data and _is_group(field, default):
            values[field.name] = from_dict(type(default), data[field.name], f"{source}: {field.name}", default)
        elif field.name in data:
            values[field.name] = data[field.name]
    return dataclasses.replace(defaults, **values) if defaults is not None else cls(**values)


def _default(field, defaults=None):
    """A field's default: its value in the ``defaults`` instance when given, else the class's."""
    if defaults is not None:
        return getattr(defaults, field.name)
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return None


def _is_group(field, default) -> bool:
    """Whether ``field`` is a nested settings group (its options are its own fields')."""
    option = field.metadata.get("option")
    return dataclasses.is_dataclass(default) and (option is None or option.flag is None)


def _options(cls, defaults=None, prefix: str = ""):
    """``(field, option, default, dest)`` of every command-line option of ``cls``, nested groups
    included with their own defaults (a group's default instance may differ from its class's, as the
    text windows of each command do)."""
    for field in dataclasses.fields(cls):
        option = field.metadata.get("option")
        default = _default(field, defaults)
        dest = f"{prefix}{field.name}"
        if _is_group(field, default):
            yield from _options(type(default), default, f"{dest}.")
        elif option is not None and option.flag is not None:
            yield field, option, default, dest


def check_object(item, where: str, required: dict[str, Kind], optional: dict[str, Kind] | None = None) -> dict:
    """A JSON object from a file, checked field by field with ``Kind`` s: unknown and missing keys
    and values of the wrong kind raise :class:`InputFileError` naming ``where`` (file and line)."""
    optional = optional or {}
    if not isinstance(item, dict):
        raise InputFileError(f"{where}: expected a JSON object, got {type(item).__name__}")
    unknown = sorted(set(item) - set(required) - set(optional))
    if unknown:
        raise InputFileError(f"{where}: unknown key(s) {unknown}; expected {sorted(required)}"
                             + (f" and optionally {sorted(optional)}" if optional else ""))
    missing = sorted(set(required) - set(item))
    if missing:
        raise InputFileError(f"{where}: missing key(s) {missing}")
    checked = {}
    for key, value in item.items():
        try:
            checked[key] = {**required, **optional}[key].check(value)
        except ValueError as err:
            raise InputFileError(f"{where}: {key}: {err}") from None
    return checked


# --- the command line ---------------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add an option for every flagged field of ``cls`` (and of its nested settings) to ``parser``.
    Unset options keep the dataclass default (argparse ``SUPPRESS``)."""
    for field, option, default, dest in _options(cls):
        shown = _shown(default, option.kind)
        text = option.text + (f" (default {shown})" if shown is not None else "")
        if _required(field):
            parser.add_argument(option.flag, dest=dest, type=_argparse_type(option.kind), required=True,
                                metavar=option.kind.metavar, help=text)
        elif isinstance(option.kind, Switch):
            parser.add_argument(option.flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=text)
        elif option.repeat:
            parser.add_argument(option.flag, dest=dest, type=_argparse_type(option.kind), action="append",
                                default=argparse.SUPPRESS, metavar=option.kind.metavar, help=text)
        else:
            parser.add_argument(option.flag, dest=dest, type=_argparse_type(option.kind), default=argparse.SUPPRESS,
                                metavar=option.kind.metavar, help=text)


def _required(field) -> bool:
    return field.default is _MISSING and field.default_factory is _MISSING


def _argparse_type(kind: Kind):
    def parse(text: str):
        try:
            return kind.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = type(kind).__name__.lower()
    return parse


def _shown(default, kind: Kind) -> str | None:
    if default is None:
        return None
    if isinstance(default, tuple):
        return ",".join(str(x) for x in default) if default else getattr(kind, "none_word", None) or "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def settings_from_args(cls, args: argparse.Namespace, defaults=None, prefix: str = ""):
    """The settings ``cls`` with every option given in ``args`` (the others at their defaults: the
    values of ``defaults``, an instance, when given)."""
    given = vars(args)
    values = {}
    for field in dataclasses.fields(cls):
        option = field.metadata.get("option")
        default = _default(field, defaults)
        dest = f"{prefix}{field.name}"
        if _is_group(field, default):
            values[field.name] = settings_from_args(type(default), args, default, prefix=f"{dest}.")
        elif dest in given:
            value = given[dest]
            values[field.name] = tuple(item for part in value for item in part) if option.repeat else value
    return dataclasses.replace(defaults, **values) if defaults is not None else cls(**values)


def flag_defaults(cls) -> dict[str, Any]:
    """``{flag: default}`` of every command-line option of ``cls`` (for tests and docs)."""
    return {option.flag: default for _, option, default, _ in _options(cls)}


def given_flags(cls, args: argparse.Namespace) -> list[str]:
    """The flags of ``cls``'s command-line options (nested settings included) that ``args`` holds:
    those given on the command line."""
    given = vars(args)
    return [option.flag for _, option, _, dest in _options(cls) if dest in given]


__all__ = ["Option", "add_options", "check_object", "check_settings", "flag_defaults", "from_dict", "given_flags",
           "setting", "settings_from_args"]
