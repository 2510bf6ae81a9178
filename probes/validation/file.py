"""The masking validation's file (``validation-SCORE.json``, written by ``headlab validate``) and
its page: reading one back checks every field the report and the plot use, so a damaged or
foreign file is one clear error, never a traceback or a page that runs its text."""

from __future__ import annotations

from pathlib import Path

from ...core.errors import InputFileError
from ...core.files import read_json_file
from ...core.kinds import Choice, Integer, Items, Kind, Maybe, Number, Switch, Text
from ...core.settings import check_object
from .settings import MASKING_MODES, METRICS

CURVE_FORMAT = "headlab-masking-curve/2"


class _Object(Kind):
    """A JSON object checked with :func:`check_object`."""

    def __init__(self, required: dict, optional: dict | None = None, where: str = "object"):
        self.required, self.optional, self.where = required, optional or {}, where

    def check(self, value):
        return check_object(value, self.where, self.required, self.optional)


class _Mapping(Kind):
    """A JSON object whose values all have one kind."""

    def __init__(self, value: Kind):
        self.value = value

    def check(self, value):
        if not isinstance(value, dict):
            raise ValueError(f"{type(value).__name__} is not an object")
        return {str(key): self.value.check(item) for key, item in value.items()}


_INTERVAL = Items(Number(), unique=False, min_items=2)
_BY_K = _Object({"top_mean": Number(), "top_ci": _INTERVAL, "random_mean": Number(), "random_ci": _INTERVAL,
                 "random_set_means": Items(Number(), unique=False), "difference": Number(),
                 "difference_ci": _INTERVAL, "rank_p": Number(0.0, 1.0), "paired_p": Number(0.0, 1.0)},
                where="summary entry")
_MEASURE_SUMMARY = _Object({"baseline_mean": Maybe(Number()), "by_k": _Mapping(_BY_K)}, where="summary")
_MEASURE = _Object({"name": Text(), "higher_is_better": Switch(), "description": Text()}, where="measure")
_CURVE = {"format": Text(), "score": Text(), "metric": Choice(*METRICS), "mode": Choice(*MASKING_MODES),
          "n_items": Integer(0), "n_used": Integer(0), "settings": Kind(),
          "measures": Items(_MEASURE, unique=False), "k": Items(Integer(1)), "items": Kind(), "heads": Kind(),
          "values": Kind(), "summary": _Mapping(_MEASURE_SUMMARY), "seconds": Number(0.0)}
_CURVE_OPTIONAL = {"model_id": Maybe(Text())}


def load_curves(folder: str | Path) -> list[dict]:
    """The masking validations (``validation-*.json``) in a report folder, each checked: a malformed
    or older-format one raises :class:`InputFileError` naming it."""
    return [load_curve(path) for path in sorted(Path(folder).glob("validation-*.json"))]


def load_curve(path: str | Path) -> dict:
    """One masking validation file, checked (see :func:`load_curves`)."""
    data = read_json_file(path, "masking validation", CURVE_FORMAT)
    curve = check_object(data, str(path), _CURVE, _CURVE_OPTIONAL)
    names = [m["name"] for m in curve["measures"]]
    if sorted(curve["summary"]) != sorted(names):
        raise InputFileError(f"{path}: the summary's measures {sorted(curve['summary'])} are not {sorted(names)}")
    for name in names:
        by_k = curve["summary"][name]["by_k"]
        if by_k and sorted(by_k, key=int) != [str(k) for k in sorted(curve["k"])]:
            raise InputFileError(f"{path}: the summary of {name} covers K {sorted(by_k)}, not {curve['k']}")
    return curve


__all__ = ["CURVE_FORMAT", "load_curve", "load_curves"]
