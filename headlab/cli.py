"""The ``headlab`` command line: one command with subcommands."""

from __future__ import annotations

import argparse
import sys

from . import convert_cli, sae_cli
from .cli_common import add_model_arguments, load_model_from



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
        if r["licence"]:
            print(f"  terms of use: {r['licence']}")
        if not r["installed"]:
            print(f"  install with: {r['install']}")
    print(f"\ncache folder: {cache_root()}")
    return 0


def _report(args) -> int:
    from .probes.report import ReportSettings, write_report
    from .probes.retrieval import NeedleSettings
    from .probes.sinks import SinkSettings

    families = tuple(x for x in args.scores.split(",") if x) if args.scores != "none" else ()
    lengths = tuple(sorted({min(1024, args.max_tokens), args.max_tokens}))
    settings = ReportSettings(
        n_samples=args.samples, n_tokens=args.tokens, seed=args.seed, text_path=args.text_file, n_views=args.views,
        scores=families, needles=NeedleSettings(lengths=lengths, text_path=args.text_file),
        sinks=SinkSettings(ratio_min=args.sink_ratio), probe_data=args.probe_data, probe_pool=args.probe_pool,
    )
    _init_distributed()
    model, tokenizer = load_model_from(args)
    path = write_report(model, tokenizer, args.model, args.out, settings)
    if path is None:  # a rank other than 0 of a torchrun job
        return 0
    print(f"report: {path}\nscores: {path.parent / 'scores.json'}, {path.parent / 'scores.csv'}")
    return 0


def _init_distributed() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _layers(text: str | None) -> list[int] | None:
    """``"2-28"`` or ``"3,5,9"`` -> layer list."""
    if text is None:
        return None
    if "-" in text:
        first, last = (int(x) for x in text.split("-", 1))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def _calibrate(args) -> int:
    from pathlib import Path

    from .surgeon.search import SearchSettings, calibration_search, default_candidates, plan_from_search
    from .surgeon.tasks import load_task

    model, tokenizer = load_model_from(args)
    examples = [ex for task in args.task for ex in load_task(task, "calibration", args.size, args.seed)]
    settings = SearchSettings(tuple(args.task), len(examples), tuple(default_candidates(model, _layers(args.layers))),
                              args.beta, args.threshold, args.margin)
    progress = Path(args.progress or f"{args.out}.progress.json")
    state = calibration_search(model, tokenizer, examples, settings, progress, args.batch_size)
    plan = plan_from_search(model, args.model, state, args.beta, args.threshold)
    plan.save(args.out)
    print(f"baseline accuracy {state['baseline']:.3f} on {len(examples)} calibration examples; "
          f"kept {len(state['kept'])} of {len(settings.candidates)} heads\nplan: {args.out}\nprogress: {progress}")
    return 0


def _eval(args) -> int:
    from .surgeon import Plan
    from .surgeon.evaluate import evaluate
    from .surgeon.files import write_json
    from .surgeon.tasks import load_task

    plan = Plan.load(args.plan) if args.plan else None
    model, tokenizer = load_model_from(args)
    results = {"model": args.model, "plan": args.plan, "split": args.split, "seed": args.seed, "tasks": {}}
    for task in args.task:
        examples = load_task(task, args.split, args.size, args.seed)
        row = {"without_plan": evaluate(model, tokenizer, examples, batch_size=args.batch_size, progress=True).to_dict()}
        if plan is not None:
            row["with_plan"] = evaluate(model, tokenizer, examples, plan, args.batch_size, progress=True).to_dict()
        results["tasks"][task] = row
        summary = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in row.items())
        print(f"{task}: {summary} (n={len(examples)})")
    write_json(args.out, results)
    print(f"results: {args.out}")
    return 0


def _view(args) -> int:
    from pathlib import Path

    from .probes import views
    from .probes.view_data import gather_view
    from .probes.view_page import write_view
    from .surgeon import Plan

    text = args.text if args.text is not None else Path(args.file).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError("the text to view is empty")
    plan = Plan.load(args.compare) if args.compare else None
    scores = _load_scores(args.scores) if args.scores else None
    model, tokenizer = load_model_from(args)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if args.max_tokens and ids.shape[1] > args.max_tokens:
        raise ValueError(f"the text is {ids.shape[1]} tokens, more than --max-tokens {args.max_tokens}; "
                         "shorten it or raise the limit")
    data = gather_view(model, tokenizer, ids, args.model, _layers(args.layers), plan,
                       int(args.max_payload_mb * 2**20), plan_label=Path(args.compare).name if plan else None)
    head = tuple(int(x) for x in args.head.split(".")) if args.head else None
    path = write_view(data, args.out, scores, head, args.plotlyjs)
    print(f"view: {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(data.tokens)} tokens, "
          f"{'one cell per token' if data.block == 1 else f'{data.block}-token blocks'})")
    if args.export:
        shown = views.view(data, *head) if head else views.view(data, scores=scores)
        print(f"figure: {views.export_figure(shown, args.export)}")
    return 0


def _validate(args) -> int:
    from pathlib import Path

    from .probes import views
    from .probes.corpus import load_text, token_windows
    from .probes.retrieval import NeedleSettings
    from .probes.validation import MaskingSettings, loss_metric, masking_curve, needle_recall_metric

    from .surgeon.files import write_json, write_text

    scores = _load_scores(args.scores)
    if args.score not in scores:
        raise ValueError(f"{args.scores} has no score {args.score!r}; it has {', '.join(scores)}")
    metric_name = args.metric or ("needle-recall" if args.score == "retrieval" else "loss")
    settings = MaskingSettings(tuple(int(k) for k in args.ks.split(",")), args.seeds, args.exclude_top, metric_name)
    model, tokenizer = load_model_from(args)
    if metric_name == "needle-recall":
        needles = NeedleSettings(lengths=tuple(sorted({min(1024, args.max_tokens), args.max_tokens})))
        metric = needle_recall_metric(model, tokenizer, needles)
    else:
        metric = loss_metric(model, token_windows(tokenizer, load_text(None), args.samples, args.tokens, args.seed))
    curve = masking_curve(scores[args.score], metric, settings)
    out = Path(args.out)
    write_json(out / f"validation-{args.score}.json", curve)
    fig = views.masking_figure(curve)
    write_text(out / f"validation-{args.score}.html", fig.to_html(include_plotlyjs=True, full_html=True))
    rows = "\n".join(f"  K={k}: top {t:.3f}, random {r:.3f}" for k, t, r in zip(curve["k"], curve["top"],
                                                                                 curve["random_mean"]))
    print(f"{metric_name} unmasked {curve['baseline']:.3f}\n{rows}\nwritten: {out / f'validation-{args.score}.json'}")
    return 0


def _load_scores(path: str) -> dict:
    """The scores of a report's scores.json."""
    import json
    from pathlib import Path

    from .probes.scores import HeadScores

    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if "scores" not in payload:
        raise ValueError(f"{path} is not a headlab scores.json (no 'scores' field)")
    return {name: HeadScores.from_dict(item) for name, item in payload["scores"].items()}


def _task_arguments(parser) -> None:
    from .surgeon.tasks import BUILTIN_TASKS

    add_model_arguments(parser)
    parser.add_argument("--task", action="append", required=True,
                        help=f"a built-in task ({', '.join(sorted(BUILTIN_TASKS))}) or a JSONL file of "
                             "{prompt, choices, label[, demonstrations]} lines; repeat for several")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--size", type=int, default=None,
                        help="examples per task (built-in default 100; JSONL: the whole split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generators / JSONL shuffle (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")


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
            "confidence scores from exact attention maps, or from streamed statistics for long windows; "
            "the families of --scores; with --probe-data, linear-probe accuracy of each head) and write "
            "OUT/report.html (standalone, opens offline), OUT/scores.json and OUT/scores.csv."
        ),
    )
    add_model_arguments(report)
    report.add_argument("--out", required=True, help="output folder (created if missing)")
    report.add_argument("--samples", type=int, default=8, help="number of text windows (default 8)")
    report.add_argument("--tokens", type=int, default=256, help="tokens per window (default 256)")
    report.add_argument("--seed", type=int, default=0, help="seed choosing the windows (default 0)")
    report.add_argument("--views", type=int, default=6, help="attention views of top heads (default 6)")
    report.add_argument(
        "--text-file", default=None, help="UTF-8 text to score on (default: Python standard-library docstrings)"
    )
    report.add_argument(
        "--scores", default="induction,gradient,retrieval,sinks,context",
        help="comma list of the score families beyond the pattern scores: induction (+ duplicate-token), "
             "gradient, ablation-zero, ablation-mean (slow: one pass per head and window), retrieval (needle in a "
             "haystack) for decoders only; sinks (massive activations, mass on hidden-state sink tokens) and "
             "context (VHD: output change when the leading half of a window is removed) for any model; 'none' "
             "for pattern scores only (default induction,gradient,retrieval,sinks,context)")
    report.add_argument("--sink-ratio", type=float, default=100.0,
                        help="sink dimension: |x_d| at the first token >= this x its median |x| and > 100 "
                             "(default 100; the published 1000 finds none in SmolLM2-135M)")
    report.add_argument("--probe-data", default=None, metavar="JSONL",
                        help='labelled texts, one {"text": ..., "label": ...} per line: adds probe_accuracy, '
                             "the 5-fold cross-validated logistic-regression accuracy on each head's output")
    report.add_argument("--probe-pool", choices=("last", "mean"), default="last",
                        help="head output probed: at the last token or averaged over tokens (default last)")
    report.add_argument("--max-tokens", type=int, default=4096,
                        help="longest needle-in-a-haystack context in tokens; the grid uses 1024 and this (default 4096)")
    report.set_defaults(run=_report)

    calibrate = sub.add_parser(
        "calibrate",
        help="ACT head search: find heads whose calibration helps a task, write a plan",
        description=(
            "Calibrate one head at a time (ACT: sink weights x beta, freed mass to the other keys) on the "
            "calibration split of the tasks, keep heads whose accuracy beats the unedited model by more than "
            "--margin, and write the plan as JSON. Progress is saved after every head; run the same command "
            "again to resume a stopped search. Multiple-choice accuracy is by choice log-probability."
        ),
    )
    _task_arguments(calibrate)
    calibrate.add_argument("--layers", default=None, help="layers to search, e.g. 2-28 or 4,8 (default 2..L-2)")
    calibrate.add_argument("--beta", type=float, default=0.4, help="sink weight factor (default 0.4)")
    calibrate.add_argument("--threshold", type=float, default=0.1, help="sink score threshold (default 0.1)")
    calibrate.add_argument("--margin", type=float, default=0.0, help="accuracy gain a head must exceed (default 0)")
    calibrate.add_argument("--progress", default=None, help="progress file (default OUT.progress.json)")
    calibrate.set_defaults(run=_calibrate)

    evaluate = sub.add_parser(
        "eval",
        help="multiple-choice accuracy with and without a plan",
        description="Accuracy of MODEL on each task's test split, without and (with --plan) with the plan's edits.",
    )
    _task_arguments(evaluate)
    evaluate.add_argument("--plan", default=None, help="a plan JSON written by 'headlab calibrate' or Plan.save")
    evaluate.add_argument("--split", default="test", choices=("calibration", "test"), help="split (default test)")
    evaluate.set_defaults(run=_eval)

    view = sub.add_parser(
        "view",
        help="interactive attention view of a text (standalone HTML)",
        description=(
            "Record the attention of every head of MODEL on a text and write one standalone HTML page: a "
            "layers x heads grid (coloured by a score; click a head), the head's query x key map with token "
            "hover (texts over 512 tokens are mean-pooled into blocks and drawn as an image), and the text "
            "coloured by the attention of a clicked query. With --compare, the map under a plan is shown "
            "beside the original with their difference."
        ),
    )
    add_model_arguments(view)
    source = view.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to view")
    source.add_argument("--file", help="a UTF-8 file holding the text to view")
    view.add_argument("--out", required=True, help="output HTML file")
    view.add_argument("--layers", default=None, help="layers to record, e.g. 10-14 or 3,7 (default all)")
    view.add_argument("--compare", default=None, metavar="PLAN", help="a plan JSON to compare against")
    view.add_argument("--scores", default=None, help="a report's scores.json to offer on the grid")
    view.add_argument("--head", default=None, metavar="L.H", help="head to open first, e.g. 17.3")
    view.add_argument("--max-tokens", type=int, default=8192, help="refuse longer texts (default 8192)")
    view.add_argument("--max-payload-mb", type=float, default=20.0,
                      help="cap on the page's encoded maps; pooling coarsens to fit (default 20)")
    view.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                      help="inline plotly.js so the page opens offline (default, +4.7 MB) or link the CDN")
    view.add_argument("--export", default=None, metavar="FILE",
                      help="also write the grid (or the --head map) as a static .png, .svg or .pdf")
    view.set_defaults(run=_view)

    validate = sub.add_parser(
        "validate",
        help="mask the top-K heads of a score vs K random heads and measure a task metric",
        description=(
            "Masking validation of a head score from a report's scores.json: zero-ablate the top-K heads and, "
            "for each of --seeds seeds, K random heads from outside the top --exclude-top, and measure the "
            "metric (needle-in-a-haystack recall for retrieval, next-token loss on text otherwise). Writes "
            "OUT/validation-SCORE.json and a plot OUT/validation-SCORE.html; a report written into the same "
            "folder afterwards shows the curve."
        ),
    )
    add_model_arguments(validate)
    validate.add_argument("--scores", required=True, help="a report's scores.json")
    validate.add_argument("--score", default="retrieval", help="the score to validate (default retrieval)")
    validate.add_argument("--out", required=True, help="output folder (e.g. the report folder)")
    validate.add_argument("--ks", default="5,10,20", help="numbers of heads to mask (default 5,10,20)")
    validate.add_argument("--seeds", type=int, default=3, help="random-K draws per K (default 3)")
    validate.add_argument("--exclude-top", type=int, default=100, help="random heads come from outside this top (default 100)")
    validate.add_argument("--metric", choices=("needle-recall", "loss"), default=None,
                          help="task metric (default: needle-recall for retrieval, else loss)")
    validate.add_argument("--max-tokens", type=int, default=2048, help="longest needle context (default 2048)")
    validate.add_argument("--samples", type=int, default=4, help="text windows for the loss metric (default 4)")
    validate.add_argument("--tokens", type=int, default=256, help="tokens per window for the loss metric (default 256)")
    validate.add_argument("--seed", type=int, default=0, help="seed of the text windows (default 0)")
    validate.set_defaults(run=_validate)
    sae_cli.add_parser(sub)
    convert_cli.add_parser(sub)
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
