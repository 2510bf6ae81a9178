"""headlab.probes: read-only measurement of attention (records, head scores, reports, views)."""

from importlib import import_module

_EXPORTS = {
    "AttentionRecord": "record",
    "HeadScores": "scores",
    "load_text": "corpus",
    "PATTERN_SCORES": "scores",
    "pattern_scores": "scores",
    "record_attention": "record",
    "ReportSettings": "report_settings",
    "ScoreAccumulator": "scores",
    "stdlib_docstrings": "corpus",
    "token_windows": "corpus",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # exports load on first use: importing the package (e.g. for the CLI) costs no torch
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = import_module(f".{module}", __name__)
    return loaded if module == name else getattr(loaded, name)


def __dir__():
    return __all__
