"""Head scores: one value per ``(layer, head)`` in a named result (:class:`HeadScores`) and the file that
holds several (a report's ``scores.json``, train-gates' ``gates.json``), checked when read. Every part
reads and writes scores through this module: the report writes them, the streaming rules, views,
atlas and validations read them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputFileError
from .files import read_json_file, write_json
from .kinds import Integer, Kind, Number, Text
from .settings import check_object


@dataclass
class HeadScores:
    """One score for every (layer, head): ``values`` and sample ``counts``, both ``[layer, head]``.

    NaN means "not analysed". ``settings`` records what produced the values.
    """

    name: str
    values: torch.Tensor
    counts: torch.Tensor
    model_id: str
    description: str = ""
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model_id": self.model_id,
            "description": self.description,
            "settings": self.settings,
            "values": [[None if math.isnan(v) else v for v in row] for row in self.values.tolist()],
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "score") -> "HeadScores":
        """The score of :meth:`to_dict`'s JSON; :class:`InputFileError` naming ``where`` for anything
        else (unknown keys, ragged or non-finite values, counts that are not whole numbers)."""
        item = check_object(data, where, {"name": Text(), "values": _Grid(Number(), allow_null=True),
                                          "counts": _Grid(Integer(0)), "model_id": Text()},
                            {"description": _String(), "settings": _Object()})
        values = torch.tensor([[math.nan if v is None else v for v in row] for row in item["values"]])
        counts = torch.tensor(item["counts"])
        if counts.shape != values.shape:
            raise InputFileError(f"{where}: counts {tuple(counts.shape)} and values {tuple(values.shape)} differ")
        return cls(item["name"], values, counts, item["model_id"], item.get("description", ""),
                   item.get("settings", {}))

    def save(self, path: str | Path) -> Path:
        """Write the score as JSON (atomically)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        return cls.from_dict(read_json_file(path, "score file"), str(path))

    def top(self, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, value)``, NaN excluded."""
        flat = self.values.flatten()
        order = [int(i) for i in torch.argsort(flat.nan_to_num(-math.inf), descending=True)]
        n_heads = self.values.shape[1]
        return [(i // n_heads, i % n_heads, float(flat[i])) for i in order if not math.isnan(flat[i])][:k]


def load_scores_file(path: str | Path, shape=None) -> dict[str, HeadScores]:
    """The scores of a report's ``scores.json``, checked (and, given the model's ``shape``, checked
    to be a model of that geometry): :class:`InputFileError` naming the file otherwise."""
    data = read_json_file(path, "scores file")
    if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
        raise InputFileError(f"{path} is not a headlab scores.json (no 'scores' object)")
    scores = {}
    for name, item in data["scores"].items():
        score = HeadScores.from_dict(item, f"{path}: score {name!r}")
        if score.name != name:
            raise InputFileError(f"{path}: score {name!r} calls itself {score.name!r}")
        if shape is not None and tuple(score.values.shape) != (shape.n_layers, shape.n_heads):
            raise InputFileError(f"{path}: score {name!r} has {tuple(score.values.shape)} heads (layers x heads), "
                                 f"the model {(shape.n_layers, shape.n_heads)}")
        scores[name] = score
    if not scores:
        raise InputFileError(f"{path} holds no scores")
    return scores


def chosen_score(path: str | Path, name: str, shape=None) -> HeadScores:
    """The score ``name`` of the scores file at ``path`` (checked against ``shape`` as in
    :func:`load_scores_file`); :class:`InputFileError` naming the scores it has when it lacks it."""
    scores = load_scores_file(path, shape)
    if name not in scores:
        raise InputFileError(f"{path} has no score {name!r}; it has {', '.join(scores)}")
    return scores[name]


def merged_scores(paths: list[str | Path], shape, needed: set[str]) -> dict[str, HeadScores]:
    """The scores of several files, each checked against ``shape``. A name in two files with other
    values is refused when it is ``needed`` (the first file's is kept otherwise)."""
    merged: dict[str, HeadScores] = {}
    for path in paths:
        for name, score in load_scores_file(path, shape).items():
            if name in merged and name in needed and not torch.equal(merged[name].values.nan_to_num(-1),
                                                                     score.values.nan_to_num(-1)):
                raise InputFileError(f"score {name!r} is in two --scores files with other values ({path} and an "
                                     "earlier one); give it once")
            merged.setdefault(name, score)
    return merged


class _Grid(Kind):
    """A rectangular ``[layer][head]`` list of values of one kind (``null`` allowed for values)."""

    def __init__(self, item: Kind, allow_null: bool = False):
        self.item, self.allow_null = item, allow_null

    def check(self, value):
        if not isinstance(value, list) or not value or not all(isinstance(row, list) and row for row in value):
            raise ValueError("expected a non-empty list of non-empty rows")
        if len({len(row) for row in value}) != 1:
            raise ValueError("rows of different lengths")
        return [[None if v is None and self.allow_null else self.item.check(v) for v in row] for row in value]


class _String(Kind):
    def check(self, value):
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value


class _Object(Kind):
    def check(self, value):
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not an object")
        return value


__all__ = ["HeadScores", "chosen_score", "load_scores_file", "merged_scores"]
