"""The masking validation's outputs: ``validation-SCORE.json`` and its page, ``validation-SCORE.html`` (the
plot), and the lines the command prints."""

from __future__ import annotations

from pathlib import Path

from ...core.escaping import element_id, html_text
from ...core.files import GENERATOR_META, claim_folder, write_json, write_text


def write_curve_page(curve: dict, path: str | Path) -> Path:
    """The masking validation as a standalone page (plotly.js inlined)."""
    from .figure import masking_figure

    page = masking_figure(curve).to_html(include_plotlyjs=True, full_html=True)
    title = html_text(f"masking validation: {curve['score']}")
    return write_text(path, page.replace("<head>", f"<head>{GENERATOR_META}<title>{title}</title>", 1))


def write_validation(out: str | Path, curve: dict, overwrite: bool = False) -> Path:
    """Write ``validation-SCORE.json`` and ``validation-SCORE.html`` into ``out`` (claimed first) and
    forget the validation's progress file; returns the JSON's path."""
    stem = f"validation-{element_id(curve['score'])}"
    out = claim_folder(out, (f"{stem}.json", f"{stem}.html"), overwrite, "--out folder")
    write_json(out / f"{stem}.json", curve)
    write_curve_page(curve, out / f"{stem}.html")
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
