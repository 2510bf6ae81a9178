"""Labelled texts for the head probes: a JSON-lines file of ``{"text": ..., "label": ...}``, checked
before any model is loaded. Importing this module costs no torch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...core.errors import InputFileError
from ...core.files import read_jsonl
from ...core.kinds import Kind, Text
from ...core.settings import check_object

FOLDS = 5  # cross-validation folds of the probes


class _Label(Kind):
    """A class label: a non-empty string or an integer (not a boolean or a fraction)."""

    def check(self, value):
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not a class label (a string or an integer)")


def load_labelled(path: str | Path, folds: int = FOLDS) -> list[tuple[str, object]]:
    """Read a JSON-lines file of ``{"text": ..., "label": ...}`` objects, one per line, checked:
    non-empty texts, labels that are strings or integers, at least two classes and ``folds``
    examples of each (the probe is cross-validated in that many folds)."""
    examples = []
    for number, item in read_jsonl(path, "labelled data"):
        line = check_object(item, f"{path}:{number}", {"text": Text(), "label": _Label()})
        examples.append((line["text"], line["label"]))
    counts = Counter(label for _, label in examples)
    if len(counts) < 2:
        raise InputFileError(f"{path} holds {len(counts)} class(es); a probe needs at least two labels")
    rare = sorted((str(label) for label, n in counts.items() if n < folds))
    if rare:
        raise InputFileError(f"{path}: label(s) {rare} have fewer than {folds} examples, the folds of the "
                             "cross-validation")
    return examples


__all__ = ["FOLDS", "load_labelled"]
