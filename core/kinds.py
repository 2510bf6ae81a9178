"""Kinds of setting values: how a value is read from the command line and checked, one class per kind
(integers that are not booleans, finite numbers inside a range, one of a few choices or of a registry,
a comma list, layer indices, an existing file, a text file). Settings (:mod:`.settings`) and the
checks of JSON files (:func:`.settings.check_object`) use them. Importing this module costs no torch.
"""

from __future__ import annotations

import codecs
import math
import re
from pathlib import Path
from typing import Any, Callable

from .errors import HeadlabError


class Kind:
    """How a setting's values are read from the command line and checked."""

    metavar = "VALUE"

    def parse(self, text: str):
        """The value of a command-line string (raise ``ValueError`` with the reason)."""
        return self.check(text)

    def check(self, value):
        """``value`` in its canonical form; ``ValueError`` with the reason when it is not allowed."""
        return value

    def describe(self) -> str:
        return ""


class Integer(Kind):
    """An integer in ``[low, high]`` (booleans and fractional numbers are refused)."""

    metavar = "N"

    def __init__(self, low: int | None = None, high: int | None = None):
        self.low, self.high = low, high

    def parse(self, text: str):
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        return self.check(value)

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ValueError(f"{value!r} is not an integer")
        if self.low is not None and value < self.low:
            raise ValueError(f"{value} is below the minimum {self.low}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{value} is above the maximum {self.high}")
        return value

    def describe(self) -> str:
        return _range(self.low, self.high, "integer")


class Number(Kind):
    """A finite number in ``[low, high]`` (``low_open``/``high_open``: the bound itself excluded)."""

    metavar = "X"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def parse(self, text: str):
        try:
            value = float(text)
        except ValueError as err:
            raise ValueError(f"{text!r} is not a number") from err
        return self.check(value)

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError(f"{value} must be {'above' if self.low_open else 'at least'} {self.low}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError(f"{value} must be {'below' if self.high_open else 'at most'} {self.high}")
        return value

    def describe(self) -> str:
        return _range(self.low, self.high, "number", self.low_open, self.high_open)


class Choice(Kind):
    """One of a few strings."""

    def __init__(self, *values: str):
        self.values = values
        self.metavar = "{" + ",".join(values) + "}"

    def check(self, value):
        if value not in self.values:
            raise ValueError(f"{value!r} is not one of {', '.join(self.values)}")
        return value


class Registered(Kind):
    """The name of an entry of ``registry`` (a dict filled by a registration decorator), looked up
    when checked, so entries registered after this kind was made count too; ``accept`` filters the
    entries offered."""

    def __init__(self, registry: dict, what: str, accept: Callable[[Any], bool] = lambda entry: True):
        self.registry, self.what, self.accept = registry, what, accept

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(name for name, entry in self.registry.items() if self.accept(entry))

    @property
    def metavar(self) -> str:
        return "{" + ",".join(self.values) + "}"

    def check(self, value):
        if value not in self.values:
            raise ValueError(f"{value!r} is not one of the {self.what}: {', '.join(self.values)}")
        return value


class Switch(Kind):
    """A yes/no setting; on the command line a flag that turns it on."""

    def check(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value


class Text(Kind):
    """A non-empty string."""

    metavar = "TEXT"

    def check(self, value):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{value!r} is not a non-empty string")
        return value


class ExistingFile(Kind):
    """The path of an existing, readable file."""

    metavar = "FILE"

    def check(self, value):
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError(f"{value!r} is not a file path")
        path = Path(value).expanduser()
        if not path.exists():
            raise ValueError(f"{value} does not exist")
        if not path.is_file():
            raise ValueError(f"{value} is not a file")
        try:
            with path.open("rb"):
                pass
        except OSError as err:
            raise ValueError(f"{value} cannot be read ({err.strerror})") from err
        return str(value)


class TextFile(ExistingFile):
    """The path of an existing file of UTF-8 text that is not blank (checked whole, in 1 MiB pieces),
    no larger than headlab reads (:data:`~headlab.core.files.MAX_READ_BYTES`)."""

    def check(self, value):
        from .files import check_size

        value = super().check(value)
        check_size(Path(value).expanduser(), str(value))
        decoder, blank = codecs.getincrementaldecoder("utf-8")(), True
        with Path(value).expanduser().open("rb") as file:
            offset = 0
            while True:
                piece = file.read(2**20)
                try:
                    text = decoder.decode(piece, final=not piece)
                except UnicodeDecodeError as err:
                    raise ValueError(f"{value} is not UTF-8 text (byte {offset + err.start}: {err.reason})") from None
                blank = blank and not text.strip()
                if not piece:
                    break
                offset += len(piece)
        if blank:
            raise ValueError(f"{value} holds no text")
        return value


class Items(Kind):
    """A comma list of items of one kind (a tuple in the library, a JSON list in files);
    ``none_word`` reads as ()."""

    def __init__(self, item: Kind, none_word: str | None = None, unique: bool = True, min_items: int = 1):
        self.item, self.none_word, self.unique, self.min_items = item, none_word, unique, min_items

    @property
    def metavar(self) -> str:
        return f"{self.item.metavar},..."

    def parse(self, text: str):
        if self.none_word is not None and text.strip() == self.none_word:
            return self.check(())
        parts = [part.strip() for part in text.split(",")]
        if any(not part for part in parts):
            raise ValueError(f"{text!r} has an empty item")
        return self.check(tuple(self.item.parse(part) for part in parts))

    def check(self, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list")
        items = tuple(self.item.check(item) for item in value)
        if len(items) < self.min_items and not (self.none_word is not None and not items):
            raise ValueError(f"needs at least {self.min_items} item(s)")
        if self.unique and len(set(items)) != len(items):
            raise ValueError(f"{list(items)} repeats an item")
        return items


class Indices(Kind):
    """Layer or head indices: a comma list of ``i`` and ranges ``a-b`` (both ends included);
    negative numbers count from the end (``-1`` is the last, ``2--2`` runs from 2 to the
    second-to-last). The value is a tuple of ints and ``(a, b)`` pairs, resolved against the
    model's size by :func:`resolve_indices`."""

    metavar = "I,A-B,..."
    _ITEM = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")

    def parse(self, text: str):
        items = []
        for part in text.split(","):
            match = self._ITEM.match(part)
            if match is None:
                raise ValueError(f"{part.strip()!r} is not an index or a range a-b (e.g. 2-28, 3,5,9, -1)")
            first, last = match.groups()
            items.append(int(first) if last is None else (int(first), int(last)))
        return self.check(tuple(items))

    def check(self, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{value!r} is not a non-empty list of indices")
        items = []
        for item in value:
            if isinstance(item, (list, tuple)) and len(item) == 2:
                first, last = (Integer().check(end) for end in item)
                if (first < 0) == (last < 0) and last < first:
                    raise ValueError(f"the range {first}-{last} is empty")
                items.append((first, last))
            else:
                items.append(Integer().check(item))
        return tuple(items)


def resolve_indices(value, n: int, what: str) -> list[int]:
    """The sorted distinct indices ``0 … n-1`` that an :class:`Indices` value names; a
    :class:`HeadlabError` naming ``what`` for an index outside the model or an empty range."""

    def one(index: int) -> int:
        resolved = index + n if index < 0 else index
        if not 0 <= resolved < n:
            raise HeadlabError(f"{what}: {index} is outside 0..{n - 1} (or -{n}..-1)")
        return resolved

    found = set()
    for item in Indices().check(value):
        if isinstance(item, tuple):
            first, last = one(item[0]), one(item[1])
            if last < first:
                raise HeadlabError(f"{what}: the range {item[0]}-{item[1]} is empty ({first} > {last})")
            found.update(range(first, last + 1))
        else:
            found.add(one(item))
    return sorted(found)


def index_spans(indices) -> str:
    """Sorted distinct ``indices`` written with runs as ranges: ``0-29``, ``0, 2``, ``5, 11, 17``."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class Maybe(Kind):
    """``None`` or a value of ``kind``."""

    def __init__(self, kind: Kind):
        self.kind, self.metavar = kind, kind.metavar

    def parse(self, text: str):
        return self.kind.parse(text)

    def check(self, value):
        return None if value is None else self.kind.check(value)

    def describe(self) -> str:
        return self.kind.describe()


def _range(low, high, noun: str, low_open: bool = False, high_open: bool = False) -> str:
    if low is None and high is None:
        return noun
    if high is None:
        return f"{noun} {'>' if low_open else '>='} {low}"
    if low is None:
        return f"{noun} {'<' if high_open else '<='} {high}"
    return f"{noun} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


__all__ = ["Choice", "ExistingFile", "Indices", "Integer", "Items", "Kind", "Maybe", "Number", "Registered", "Switch",
           "Text", "TextFile", "index_spans", "resolve_indices"]
