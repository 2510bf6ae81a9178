"""The KV-cache compression evaluation's outputs: ``compression.json`` and its page, ``compression.html``
(the curves and a table), and the lines the command prints."""

from __future__ import annotations

from pathlib import Path

from ...core.escaping import html_text
from ...core.files import GENERATOR_META, claim_folder, write_json, write_text
from ..figures import check_plotly_source, figure_div, plotly_script
from .figure import compression_figure
from .file import FULL, compression_title, is_conversion
from .settings import PROGRESS_FILE


def write_compression_page(result: dict, path: str | Path, plotlyjs: str = "file") -> Path:
    """The evaluation as a page: its title, the curves under their heading and the summary table under
    its own; plotly.js as ``plotlyjs`` says (:func:`~headlab.probes.figures.plotly_script`)."""
    path = Path(path)
    title = html_text(compression_title(result))
    tasks = list(dict.fromkeys(task for row in result["summary"] for task in row.get("tasks", {})))
    header = ("<tr><th>rule or press</th><th>kept</th><th>KV heads whole</th><th>length</th><th>recall [95%]</th>"
              + "".join(f"<th>{html_text(task)} [95%]</th>" for task in tasks)
              + "<th>perplexity</th><th>KV cache</th><th>seconds</th></tr>")
    lines = []
    for row in sorted(result["summary"], key=lambda r: (r["length"], r["rule"] != FULL, r["rule"], r["keep"])):
        share = "" if row["kv_fraction"] is None else f" ({row['kv_fraction']:.0%})"
        rule = "base" if is_conversion(result) and row["rule"] == FULL else row["rule"]
        lines.append(f"<tr><td>{html_text(rule)}</td><td>{row['keep']:.0%}</td><td>{row['full_heads']}</td>"
                     f"<td>{row['length']}</td><td>{row['recall']:.2f} [{row['recall_ci'][0]:.2f}, "
                     f"{row['recall_ci'][1]:.2f}]</td>{_task_cells(row, tasks)}<td>{row['perplexity']:.2f}</td>"
                     f"<td>{row['kv_bytes'] / 2**20:.1f} MiB{share}</td><td>{row['seconds']:.0f}</td></tr>")
    figure = figure_div(compression_figure(result), "compression")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{GENERATOR_META}<title>{title}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.box{max-width:100%;overflow-x:auto}</style>"
            f"{plotly_script(path.parent, plotlyjs)}</head><body><h1>{title}</h1>"
            f"<h2>Recall and perplexity</h2><div class='box'>{figure}</div>"
            f"<h2>Every condition</h2><div class='box'><table>{header}{''.join(lines)}</table></div></body></html>")
    return write_text(path, page)


def _task_cells(row: dict, tasks: list[str]) -> str:
    """The long tasks' scores of a summary row, with their intervals (blank where not measured)."""
    cells = []
    for task in tasks:
        score = row.get("tasks", {}).get(task)
        cells.append("<td></td>" if score is None else
                     f"<td>{score['score']:.2f} [{score['score_ci'][0]:.2f}, {score['score_ci'][1]:.2f}]</td>")
    return "".join(cells)


def write_compression(out: str | Path, result: dict, overwrite: bool = False, plotlyjs: str = "file") -> Path:
    """Write ``compression.json`` and ``compression.html`` into ``out`` (claimed first; ``plotlyjs`` as
    for :func:`write_compression_page`) and forget the evaluation's progress file; returns the JSON's path."""
    check_plotly_source(out, plotlyjs)
    out = claim_folder(out, ("compression.json", "compression.html"), overwrite, "--out folder")
    write_json(out / "compression.json", result)
    write_compression_page(result, out / "compression.html", plotlyjs)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return out / "compression.json"


def summary_lines(result: dict) -> str:
    """One line per measured condition: recall with its interval, perplexity and cache size."""
    return "\n".join(
        f"{row['length']:>6} {row['rule']:>12} keep {row['keep']:.0%}: recall {row['recall']:.2f} "
        f"[{row['recall_ci'][0]:.2f}, {row['recall_ci'][1]:.2f}], perplexity {row['perplexity']:.2f}, "
        f"KV {row['kv_bytes'] / 2**20:.1f} MiB"
        + "".join(f", {task} {score['score']:.2f}" for task, score in row.get("tasks", {}).items())
        for row in sorted(result["summary"], key=lambda r: (r["length"], r["rule"], r["keep"])))


__all__ = ["summary_lines", "write_compression", "write_compression_page"]
