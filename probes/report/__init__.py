"""The head-importance report: its settings (:mod:`.settings`), scoring every head into ``scores.json`` and
``scores.csv`` and reading a finished report back (:mod:`.scoring`), and its pages, ``report.html`` and
``views.html`` (:mod:`.page`), which show what the other products wrote into the same folder."""

from ...core.lazy import lazy_exports

_EXPORTS = {"ReportSettings": "settings", "write_report": "scoring", "rewrite_report_pages": "scoring",
            "show_score": "page"}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
