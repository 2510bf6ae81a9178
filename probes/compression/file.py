"""The file of a KV-cache compression evaluation (``compression.json``): its format, its rule names,
the check of a file found in a folder and its title; no model work (the report, the pages and the
figure read it)."""

from __future__ import annotations

from pathlib import Path

from ...core.files import read_json_file
from ...core.kinds import Choice, Integer, Items, Kind, Maybe, Number, Text
from ...core.settings import check_object

COMPRESSION_FORMAT = "headlab-compression/1"
FULL = "full"  # the unedited (or base) model's rule name
CONVERTED = "converted"  # a converted checkpoint's rule name

_ROW = {"rule": Text(), "keep": Number(0.0, 1.0), "length": Integer(1), "draws": Integer(1), "full_heads": Integer(0),
        "recall": Number(0.0, 1.0), "recall_ci": Items(Number(0.0, 1.0), unique=False, min_items=2),
        "rouge1_recall": Number(0.0, 1.0), "loss": Number(), "perplexity": Number(0.0), "kv_bytes": Number(0.0),
        "kv_fraction": Maybe(Number(0.0)), "seconds": Number(0.0)}


def load_compression(folder: str | Path) -> dict | None:
    """The evaluation in ``folder / compression.json`` (None when there is none), checked: a damaged
    or foreign file is one :class:`~headlab.core.errors.InputFileError` naming it."""
    path = Path(folder) / "compression.json"
    if not path.exists():
        return None
    data = read_json_file(path, "compression evaluation", COMPRESSION_FORMAT)
    check_object(data, str(path), {"format": Text(), "summary": Items(Kind(), unique=False, min_items=0)},
                 {"model_id": Maybe(Text()), "settings": Kind(), "kv_heads": Integer(0), "items": Kind(),
                  "runs": Kind(), "kind": Choice("streaming", "conversion"), "base_model": Maybe(Text())})
    data["summary"] = [check_object(row, f"{path}: summary row {i}", _ROW, {"tasks": Kind()})
                       for i, row in enumerate(data["summary"])]
    return data


def is_conversion(result: dict) -> bool:
    """Whether ``result`` evaluates a converted checkpoint against its base (else streaming heads)."""
    return result.get("kind") == "conversion"


def compression_title(result: dict) -> str:
    """The evaluation's title (plain text: escape it for its context)."""
    model = result.get("model_id") or "model"
    if not is_conversion(result):
        return f"KV-cache compression: {model}"
    base = result.get("base_model")
    return f"{model}: converted to linear attention, against " + (base if base else "no base model")


__all__ = ["COMPRESSION_FORMAT", "CONVERTED", "FULL", "compression_title", "is_conversion", "load_compression"]
