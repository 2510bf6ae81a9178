"""The masking validation's outputs: ``validation-SCORE.json`` and its page, ``validation-SCORE.html`` (the
plot), and the lines the command prints."""

from __future__ import annotations

from pathlib import Path

from ...core.escaping import element_id, html_text
from ...core.files import GENERATOR_META, claim_folder, write_json, write_text
from ..figures import check_plotly_source, figure_div, plotly_script


def write_curve_page(curve: dict, path: str | Path, plotlyjs: str = "file") -> Path:
    """The masking validation as a page: what was masked and measured, then the plot; plotly.js as
    ``plotlyjs`` says (:func:`~headlab.probes.figures.plotly_script`)."""
    from .figure import masking_figure, masking_subtitle

    path = Path(path)
    title = html_text(f"masking validation: {curve['score']}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{GENERATOR_META}<title>{title}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5em}.box{max-width:100%;overflow-x:auto}</style>"
            f"{plotly_script(path.parent, plotlyjs)}</head><body><h1>{title}</h1><p>{html_text(masking_subtitle(curve))}"
            f"</p><div class='box'>{figure_div(masking_figure(curve), 'masking', curve['score'])}</div></body></html>")
    return write_text(path, page)


def write_validation(out: str | Path, curve: dict, overwrite: bool = False, plotlyjs: str = "file") -> Path:
    """Write ``validation-SCORE.json`` and ``validation-SCORE.html`` into ``out`` (claimed first;
    ``plotlyjs`` as for :func:`write_curve_page`) and forget the validation's progress file; returns
    the JSON's path."""
    stem = f"validation-{element_id(curve['score'])}"
    check_plotly_source(out, plotlyjs)
    out = claim_folder(out, (f"{stem}.json", f"{stem}.html"), overwrite, "--out folder")
    write_json(out / f"{stem}.json", curve)
    write_curve_page(curve, out / f"{stem}.html", plotlyjs)
    (out / f"{stem}.progress.json").unlink(missing_ok=True)
    return out / f"{stem}.json"


def curve_lines(curve: dict) -> str:
    """A few lines of the result: per measure and K the means and both p-values."""
    lines = [f"{curve['metric']}, {curve['mode']} masking: {curve['n_used']} of {curve['n_items']} items used"]
    for name, summary in curve["summary"].items():
        if summary["baseline_mean"] is None:
            continue
        lines.append(f"{name}: unmasked {summary['baseline_mean']:.3f}")
        for k, row in summary["by_k"].items():
            lines.append(f"  K={k}: top {row['top_mean']:.3f}, random {row['random_mean']:.3f} "
                         f"(rank p {row['rank_p']:.3g}, paired p {row['paired_p']:.3g})")
    return "\n".join(lines)


__all__ = ["curve_lines", "write_curve_page", "write_validation"]
