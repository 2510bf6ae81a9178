"""The ``headlab`` command line: one command with subcommands.

Every subcommand checks its arguments (through the settings classes that define them for the
library too), its input files and its outputs before it loads a model; bad input ends in one
line and exit status 2, Ctrl-C in one line saying what was kept and exit status 130. Importing
this module costs no torch, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

from . import cli_common as common
from . import convert_cli, sae_cli
from .core.errors import HeadlabError, InputFileError, ModelSpecError
from .core.files import check_folder, claim_file, claim_folder


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
    from .probes.scorers.families import requested_families
    from .probes.report.settings import ReportSettings
    from .probes.validation.file import load_curves

    settings = common.settings(ReportSettings, args)
    if args.page_only:
        return _report_pages(args, settings)
    check_folder(args.out, args.overwrite, "--out report folder")
    load_curves(args.out)
    from .probes.atlas.page import load_atlas
    from .probes.compression.file import load_compression

    load_compression(args.out)
    load_atlas(args.out)
    config = common.model_config(args)
    _check_window_fits(config, settings.n_tokens, "--tokens")
    from .surgeon.models import is_causal_lm

    from .surgeon.conversion.converted import is_converted_directory

    converted = Path(args.model).is_dir() and is_converted_directory(args.model)
    if converted:
        from .probes.report.scoring import check_converted_windows

        check_converted_windows(config, settings.n_tokens)
    for name, reason in requested_families(settings, is_causal_lm(config), converted)[1].items():
        print(f"headlab report: note: skipping the {name} score of {args.model}: it {reason}", file=sys.stderr)
    from .core.distributed import init_distributed

    init_distributed()
    model, tokenizer = common.load_model_from(args)
    from .probes.report.scoring import write_report

    path = write_report(model, tokenizer, args.model, args.out, settings, overwrite=args.overwrite)
    if path is None:  # a rank other than 0 of a torchrun job
        return 0
    print(f"report: {path}\nscores: {path.parent / 'scores.json'}, {path.parent / 'scores.csv'}")
    return 0


def _report_pages(args, settings) -> int:
    """``report --page-only``: the pages of a finished report folder written again, no scoring."""
    from .probes.report.settings import ReportSettings
    from .core.settings import given_flags

    ignored = [flag for flag in given_flags(ReportSettings, args) if flag != "--views"]
    if ignored or args.overwrite:
        raise HeadlabError("--page-only writes the pages from the folder's scores.json as they were scored: it takes "
                           f"--views, not {', '.join(ignored + ['--overwrite'] * args.overwrite)}")
    if not (Path(args.out) / "scores.json").is_file():
        raise HeadlabError(f"{args.out} holds no scores.json: --page-only rewrites the pages of a finished report")
    from .probes.atlas.page import load_atlas
    from .probes.compression.file import load_compression
    from .probes.report.scoring import finished_report, rewrite_report_pages
    from .probes.validation.file import load_curves

    finished_report(Path(args.out), args.model)  # all checked before the model loads
    load_curves(args.out)
    load_compression(args.out)
    load_atlas(args.out)
    check_folder(args.out, False, "--out report folder")
    common.model_config(args)
    model, tokenizer = common.load_model_from(args)

    path = rewrite_report_pages(model, tokenizer, args.model, args.out, settings.n_views, settings.top_k)
    print(f"report: {path} (pages written again from {path.parent / 'scores.json'})")
    return 0


def _check_window_fits(config, n_tokens: int, flag: str) -> None:
    """Refuse windows longer than a model with a table of learned positions has rows (BERT, GPT-2);
    rotary models take longer inputs."""
    from .core.shape import text_config

    cfg = text_config(config)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    rotary = getattr(cfg, "rope_parameters", None) is not None or getattr(cfg, "rope_theta", None) is not None
    if limit and not rotary and n_tokens > limit:
        raise HeadlabError(f"{flag} {n_tokens} is longer than the {limit} positions this model has")


def _calibrate(args) -> int:
    from .surgeon.search.settings import CalibrationSettings
    from .surgeon.search.tasks import TaskSettings

    tasks, search = common.settings(TaskSettings, args), common.settings(CalibrationSettings, args)
    claim_file(args.out, args.overwrite, "--out plan")
    progress = Path(args.progress or f"{args.out}.progress.json")
    claim_file(progress, args.overwrite, "--progress file")
    examples = tasks.examples("calibration")
    config = common.model_config(args, causal=True, needs="the calibration search")
    shape = common.model_shape_of(config)
    layers = common.layers_of(search.layers, shape.n_layers, "--layers")
    from .surgeon.edits.base import FIRST_EDITABLE_LAYER

    if layers is not None and min(layers) < FIRST_EDITABLE_LAYER:
        raise HeadlabError(f"--layers: layers 0-{FIRST_EDITABLE_LAYER - 1} are never calibrated (ACT)")
    converted = sorted(set(layers or ()) & set(common.converted_layers_of(args.model, config)))
    if converted:
        named = f"layer {converted[0]} is" if len(converted) == 1 else f"layers {', '.join(map(str, converted))} are"
        raise HeadlabError(f"--layers: {named} converted to linear attention, which has no sinks to calibrate")
    model, tokenizer = common.load_model_from(args)
    from .surgeon.search.calibration import SearchSettings, calibration_search, default_candidates, plan_from_search

    record = SearchSettings(tasks.tasks, len(examples), tuple(default_candidates(model, layers)), search.beta,
                            search.threshold, search.margin)
    state = calibration_search(model, tokenizer, examples, record, progress, tasks.batch_size)
    plan = plan_from_search(model, args.model, state, search.beta, search.threshold)
    plan.save(args.out)
    print(f"baseline accuracy {state['baseline']:.3f} on {len(examples)} calibration examples; "
          f"kept {len(state['kept'])} of {len(record.candidates)} heads\nplan: {args.out}\nprogress: {progress}")
    return 0


def _eval(args) -> int:
    from .core.files import write_json
    from .surgeon.plan import Plan
    from .surgeon.search.tasks import TaskSettings

    tasks = common.settings(TaskSettings, args)
    claim_file(args.out, args.overwrite, "--out results")
    plan = Plan.load(args.plan) if args.plan else None
    examples = {task: TaskSettings(tasks=(task,), size=tasks.size, seed=tasks.seed).examples(args.split)
                for task in tasks.tasks}
    config = common.model_config(args, causal=True, needs="task evaluation")
    if plan is not None:
        plan.validate(common.model_shape_of(config))
    model, tokenizer = common.load_model_from(args)
    from .surgeon.search.accuracy import evaluate

    results = {"format": "headlab-eval/1", "model": args.model, "plan": args.plan, "split": args.split,
               "seed": tasks.seed, "tasks": {}}
    for task, items in examples.items():
        row = {"without_plan": evaluate(model, tokenizer, items, batch_size=tasks.batch_size, progress=True).to_dict()}
        if plan is not None:
            row["with_plan"] = evaluate(model, tokenizer, items, plan, tasks.batch_size, progress=True).to_dict()
        results["tasks"][task] = row
        summary = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in row.items())
        print(f"{task}: {summary} (n={len(items)})")
    write_json(args.out, results)
    print(f"results: {args.out}")
    return 0


def _view(args) -> int:
    from .probes.views.settings import ViewSettings
    from .core.head_scores import load_scores_file
    from .core.files import read_text_file
    from .surgeon.plan import Plan

    view = common.settings(ViewSettings, args)
    claim_file(args.out, args.overwrite, "--out page")
    if args.export:
        if Path(args.export).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise HeadlabError(f"--export {args.export}: the figure must be a .png, .svg or .pdf file")
        claim_file(args.export, args.overwrite, "--export figure")
    text = args.text if args.text is not None else read_text_file(args.file, "--file")
    if not text.strip():
        raise InputFileError("the text to view is empty")
    plan = Plan.load(args.compare) if args.compare else None
    config = common.model_config(args)
    shape = common.model_shape_of(config)
    if plan is not None:
        plan.validate(shape)
    scores = load_scores_file(args.scores, shape) if args.scores else None
    layers = common.layers_of(view.layers, shape.n_layers, "--layers")
    head = None
    if view.head is not None:
        head = (common.one_layer(view.head[0], shape.n_layers, "--head"), view.head[1])
        if head[1] >= shape.n_heads:
            raise HeadlabError(f"--head: the model's heads are 0..{shape.n_heads - 1}, not {head[1]}")
        if layers is not None and head[0] not in layers:
            raise HeadlabError(f"--head {head[0]}.{head[1]} is on a layer --layers does not record")
    model, tokenizer = common.load_model_from(args)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] > view.max_tokens:
        raise HeadlabError(f"the text is {ids.shape[1]} tokens, more than --max-tokens {view.max_tokens}; "
                           "shorten it or raise the limit")
    from .probes.figures import export_figure
    from .probes.views.figure import view
    from .probes.views.data import gather_view
    from .probes.views.page import write_view

    data = gather_view(model, tokenizer, ids, args.model, layers, plan, int(view.max_payload_mb * 2**20),
                       plan_label=Path(args.compare).name if plan else None)
    path = write_view(data, args.out, scores, head, view.plotlyjs, overwrite=args.overwrite)
    tokens = f"{len(data.tokens)} token{'s' if len(data.tokens) != 1 else ''}"
    print(f"view: {path} ({path.stat().st_size / 2**20:.1f} MiB, {tokens}, "
          f"{'one cell per token' if data.block == 1 else f'{data.block}-token blocks'})")
    if args.export:
        shown = view(data, *head) if head else view(data, scores=scores)
        print(f"figure: {export_figure(shown, args.export)}")
    return 0


def _chosen_score(args, shape):
    """The ``--score`` of the ``--scores`` file, checked against the model's ``shape``."""
    from .core.head_scores import load_scores_file

    scores = load_scores_file(args.scores, shape)
    if args.score not in scores:
        raise InputFileError(f"{args.scores} has no score {args.score!r}; it has {', '.join(scores)}")
    return scores[args.score]


def _validate(args) -> int:
    from .probes.validation.settings import ValidationSettings

    settings = common.settings(ValidationSettings, args)
    config = common.model_config(args)
    common.refuse_converted(args, config, "the masking validation")
    shape = common.model_shape_of(config)
    score = _chosen_score(args, shape)
    metric = settings.masking.metric or ("needle-recall" if args.score == "retrieval" else "loss")
    out = Path(args.out)
    stem = f"validation-{_file_safe(args.score)}"
    check_folder(out, args.overwrite, "--out folder")
    from .surgeon.models import is_causal_lm

    if metric == "needle-recall" and not is_causal_lm(config):
        raise ModelSpecError(f"{args.model} is not a causal language model; needle recall needs one (use --metric loss)")
    from .probes.validation.run import validate_score, validation_identity, write_curve_page
    from .core.files import write_json
    from .core.journal import Journal

    progress = out / f"{stem}.progress.json"
    Journal(progress, validation_identity(score, settings, args.model), "validation")  # not another validation's
    model, tokenizer = common.load_model_from(args)
    curve = validate_score(model, tokenizer, score, settings, model_id=args.model, journal_path=progress)
    claim_folder(out, (f"{stem}.json", f"{stem}.html"), args.overwrite, "--out folder")
    write_json(out / f"{stem}.json", curve)
    write_curve_page(curve, out / f"{stem}.html")
    progress.unlink(missing_ok=True)
    print(_validation_lines(curve))
    print(f"written: {out / f'{stem}.json'} and {stem}.html")
    return 0


def _stream_plan(args) -> int:
    from .surgeon.streaming.settings import StreamingSettings

    settings = common.settings(StreamingSettings, args)
    claim_file(args.out, args.overwrite, "--out plan")
    config = common.model_config(args, causal=True, needs="a plan of streaming heads")
    common.refuse_converted(args, config, "a plan of streaming heads")
    shape = common.model_shape_of(config)
    from .core.head_scores import load_scores_file
    from .surgeon.streaming.rules import candidates, rule_ranking, streaming_plan

    scores = load_scores_file(args.scores, shape) if args.scores else None
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    ranking = rule_ranking(args.score, scores, shape, layer_types, settings.seed)
    plan = streaming_plan(ranking, shape, settings, model_id=args.model)
    plan.save(args.out)
    total = len(candidates(shape, layer_types))
    streaming = sum(len(edit.heads) for edit in plan.edits) // shape.group_size
    print(f"{total - streaming} of {total} KV heads of the global-attention layers keep the whole "
          f"context (rule {args.score}); {streaming} stream with {settings.sinks} sink tokens and a "
          f"{settings.window}-position window{' and a compensation token' if settings.compensate else ''}"
          f"\nplan: {args.out}")
    return 0


def _merged_scores(paths: list[str], shape, rules: tuple[str, ...]) -> dict:
    """The scores of several files, each checked against ``shape``. A name in two files with other
    values is refused when a rule reads it (razor reads echo and razor_induction)."""
    import torch

    from .core.head_scores import load_scores_file
    from .surgeon.streaming.rules import rule_scores

    merged: dict = {}
    needed = {name for rule in rules for name in rule_scores(rule)}
    for path in paths:
        for name, score in load_scores_file(path, shape).items():
            if name in merged and name in needed and not torch.equal(merged[name].values.nan_to_num(-1),
                                                                     score.values.nan_to_num(-1)):
                raise InputFileError(f"score {name!r} is in two --scores files with other values ({path} and an "
                                     "earlier one); give it once")
            merged.setdefault(name, score)
    return merged


def _stream_eval(args) -> int:
    from .probes.compression.settings import CompressionSettings

    settings = common.settings(CompressionSettings, args)
    out = Path(args.out)
    check_folder(out, args.overwrite, "--out folder")
    config = common.model_config(args, causal=True, needs="needle recall and perplexity")
    if common.converted_layers_of(args.model, config):
        return _conversion_eval(args, settings, config, out)
    if args.base is not None:
        raise HeadlabError(f"--base is for a checkpoint converted to linear attention; {args.model} is not one")
    shape = common.model_shape_of(config)
    from .probes.compression.run import PROGRESS_FILE, conditions, evaluate_compression, streaming_identity
    from .core.journal import Journal

    scores = _merged_scores(args.scores, shape, settings.rules) if args.scores else None
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    measured = conditions(shape, scores, settings, layer_types, args.model)  # a rule without its scores fails here
    Journal(out / PROGRESS_FILE, streaming_identity(measured, settings, args.model), "compression")  # not another's
    model, tokenizer = common.load_model_from(args)
    result = evaluate_compression(model, tokenizer, scores, settings, model_id=args.model,
                                  journal_path=out / PROGRESS_FILE)
    return _write_compression(out, result, args.overwrite)


def _conversion_eval(args, settings, config, out: Path) -> int:
    """stream-eval of a converted checkpoint: it and then its base, each loaded alone, on the same
    prompts and windows (tokenised by the checkpoint's tokenizer, which convert saved from the base)."""
    import gc

    from .probes.compression.run import PROGRESS_FILE, conversion_identity, conversion_result, conversion_runs
    from .probes.compression.file import CONVERTED, FULL
    from .surgeon.streaming.rules import candidates
    from .surgeon import load_model
    from .core.journal import Journal

    base = _conversion_base(args, config)
    journal = Journal(out / PROGRESS_FILE, conversion_identity(settings, args.model, base), "compression")
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    kv_heads = len(candidates(common.model_shape_of(config), layer_types))
    model, tokenizer = common.load_model_from(args)
    runs = conversion_runs(model, tokenizer, CONVERTED, settings, journal=journal)
    if base is not None:
        del model
        gc.collect()
        base_model = load_model(base, max_memory=args.max_memory)[0]
        runs += conversion_runs(base_model, tokenizer, FULL, settings, journal=journal)
    return _write_compression(out, conversion_result(runs, settings, kv_heads, args.model, base), args.overwrite)


def _conversion_base(args, config) -> str | None:
    """The base model a converted checkpoint is measured against (``--base``, else the one its
    conversion recorded; None for ``--base none``), checked from its config before any loading:
    the same shape and vocabulary size, a causal LM, not converted itself. Streaming-head options
    are refused: the checkpoint is measured as it is."""
    from .probes.compression.run import STREAMING_ONLY
    from .probes.compression.settings import CompressionSettings
    from .surgeon.conversion.converted import read_conversion
    from .core.settings import given_flags

    flags = {f.metadata["option"].flag for f in dataclasses.fields(CompressionSettings) if f.name in STREAMING_ONLY}
    refused = [flag for flag in given_flags(CompressionSettings, args) if flag in flags]
    refused += ["--scores"] if args.scores else []
    if refused:
        raise HeadlabError(f"{args.model} is converted to linear attention: stream-eval measures it as it is against "
                           f"its base model, and {', '.join(refused)} (streaming heads) do not apply")
    base = args.base if args.base is not None else read_conversion(args.model)[1].get("base_model")
    if base is None:
        raise ModelSpecError(f"{args.model} does not record the model it was converted from: give --base MODEL "
                             "(or --base none to measure the checkpoint alone)")
    if base == "none":
        return None
    try:
        base_config = common.model_config(args, base, causal=True, needs="the base of a converted checkpoint")
    except ModelSpecError as error:
        if args.base is not None:
            raise
        raise ModelSpecError(f"the base model {args.model} records, {base!r}, cannot be read ({error}); give --base "
                             "MODEL or --base none") from None
    if common.converted_layers_of(base, base_config):
        raise ModelSpecError(f"--base {base} is itself converted to linear attention; give the softmax model")
    mismatch = [what for what, a, b in (("shape", common.model_shape_of(config), common.model_shape_of(base_config)),
                                        ("vocabulary size", config.get_text_config(decoder=True).vocab_size,
                                         base_config.get_text_config(decoder=True).vocab_size)) if a != b]
    if mismatch:
        raise ModelSpecError(f"--base {base} differs from {args.model} in {' and '.join(mismatch)}; give the model it "
                             "was converted from")
    return base


def _write_compression(out: Path, result: dict, overwrite: bool) -> int:
    """Write compression.json and compression.html into ``out``, forget the progress file and print
    the summary."""
    from .probes.compression.run import PROGRESS_FILE, write_compression_page
    from .core.files import write_json

    claim_folder(out, ("compression.json", "compression.html"), overwrite, "--out folder")
    write_json(out / "compression.json", result)
    write_compression_page(result, out / "compression.html")
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    for row in sorted(result["summary"], key=lambda r: (r["length"], r["rule"], r["keep"])):
        print(f"{row['length']:>6} {row['rule']:>12} keep {row['keep']:.0%}: recall {row['recall']:.2f} "
              f"[{row['recall_ci'][0]:.2f}, {row['recall_ci'][1]:.2f}], perplexity {row['perplexity']:.2f}, "
              f"KV {row['kv_bytes'] / 2**20:.1f} MiB")
    print(f"written: {out / 'compression.json'} and compression.html")
    return 0


def _train_gates(args) -> int:
    from .surgeon.streaming.settings import GateSettings

    settings = common.settings(GateSettings, args)
    out = Path(args.out)
    check_folder(out, args.overwrite, "--out folder")
    common.refuse_converted(args, common.model_config(args, causal=True, needs="gate training"), "gate training")
    model, tokenizer = common.load_model_from(args)
    from .surgeon.streaming.gates import GATES_FILE, PLAN_FILE, STATE_FILE, GateTraining

    training = GateTraining(model, tokenizer, settings, out)  # checks the text; resumes from the folder's state
    claim_folder(out, (STATE_FILE, GATES_FILE, PLAN_FILE), args.overwrite, "--out folder")
    if training.step:
        print(f"resuming from step {training.step} of {settings.steps} ({out / STATE_FILE})")
    gates = training.run()
    training.write(out, args.model)
    trained = gates[list(training.layers)]
    kept, total = int((trained >= 0.5).sum()), trained.numel()
    print(f"{kept} of {total} KV heads have a gate of at least 0.5 (mean gate {float(trained.mean()):.3f}) "
          f"after {training.step} steps in {training.seconds:.0f} s\nscores: {out / GATES_FILE} (score duo_gate)\n"
          f"plan: {out / PLAN_FILE}")
    return 0


def _atlas(args) -> int:
    from .probes.atlas.settings import AtlasSettings

    settings = common.settings(AtlasSettings, args)
    if args.compare and args.model2:
        raise HeadlabError("compare with a second model or with a plan (--compare), not both")
    out = Path(args.out)
    check_folder(out, args.overwrite, "--out folder")
    config = common.model_config(args)
    shape = common.model_shape_of(config)
    _check_window_fits(config, settings.tokens, "--tokens")
    if args.model2:
        common.model_config(args, spec=args.model2)
    from .core.head_scores import load_scores_file
    from .surgeon.plan import Plan

    scores = load_scores_file(args.scores, shape) if args.scores else {}
    plan = Plan.load(args.compare) if args.compare else None
    if plan is not None:
        plan.validate(shape)
    from .probes.atlas.build import atlas_document, build_atlas, describe_heads
    from .probes.atlas.page import write_atlas_page
    from .core.text import load_text, token_windows
    from .core.files import write_json

    text = load_text(settings.text_path)
    sets, labels = [], []
    for spec in [args.model] + ([args.model2] if args.model2 else []):
        model, tokenizer = common.load_model_from(args, spec)
        windows = token_windows(tokenizer, text, settings.samples, settings.tokens, settings.seed)
        sets.append(describe_heads(model, windows, label=spec))
        labels.append(spec)
        if plan is not None:
            sets.append(describe_heads(model, windows, plan, label="with the plan"))
            labels.append(f"{spec} with {Path(args.compare).name}")
    atlas = build_atlas(sets, [scores] + [{}] * (len(sets) - 1), settings.clusters, settings.seed)
    doc = atlas_document(atlas, labels, {**dataclasses.asdict(settings), "compare": args.compare})
    claim_folder(out, ("atlas.json", "atlas.html"), args.overwrite, "--out folder")
    write_json(out / "atlas.json", doc)
    write_atlas_page(doc, out / "atlas.html")
    for row in doc["cluster_table"]:  # with several models or a plan, each head says whose it is
        print(f"{row['name']}: {row['size']} heads, e.g. "
              + ", ".join(f"L{l}.H{h}" + (f" ({labels[s]})" if len(labels) > 1 else "")
                          for s, l, h in row["examples"][:3]))
    moved = atlas.displacement()
    if moved is not None:
        top = sorted(((float(moved[l, h]), l, h) for l in range(moved.shape[0]) for h in range(moved.shape[1])),
                     reverse=True)[:5]
        print("moved most: " + ", ".join(f"L{l}.H{h} ({d:.2f})" for d, l, h in top))
    print(f"written: {out / 'atlas.json'} and atlas.html")
    return 0


def _validation_lines(curve: dict) -> str:
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


def _file_safe(name: str) -> str:
    """A score name as part of a file name (letters, digits, ``-``, ``_`` and ``.`` only)."""
    from .core.escaping import element_id

    return element_id(name)


def _task_arguments(parser) -> None:
    from .surgeon.search.tasks import TaskSettings

    common.add_model_arguments(parser)
    common.add_settings(parser, TaskSettings)


def _score_arguments(parser, what: str, required: bool = True) -> None:
    """``--scores`` (a report's scores.json) and ``--score`` (one of its scores, default retrieval)."""
    parser.add_argument("--scores", required=required, metavar="SCORES",
                        help="a report's scores.json" + ("" if required else " (not needed by the random rule)"))
    parser.add_argument("--score", default="retrieval", help=f"{what} (default retrieval)")


def build_parser() -> common.Parser:
    parser = common.Parser(prog="headlab",
                           description="Surgery on, and interpretation of, the attention heads of pretrained "
                                       "transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list the bundled models and whether they are installed")
    models.set_defaults(run=_models, interrupted=common.interrupted("nothing was written"))

    from .probes.report.settings import ReportSettings
    from .probes.compression.settings import PROGRESS_FILE, CompressionSettings
    from .probes.atlas.settings import AtlasSettings
    from .probes.validation.settings import ValidationSettings
    from .probes.views.settings import ViewSettings
    from .surgeon.streaming.settings import GateSettings
    from .surgeon.search.settings import CalibrationSettings
    from .surgeon.streaming.settings import StreamingSettings

    report = sub.add_parser(
        "report", help="score every head and write a head-importance report",
        description="Score every attention head of MODEL on real text (sink, entropy, previous-token and confidence "
                    "scores from exact attention maps, or from streamed statistics for long windows; the families of "
                    "--scores; with --probe-data, linear-probe accuracy of each head) and write OUT/report.html "
                    "(standalone, opens offline), OUT/scores.json and OUT/scores.csv.")
    common.add_model_arguments(report)
    common.add_output_arguments(report, "output folder (created if missing; new, empty or headlab's own)")
    common.add_settings(report, ReportSettings)
    report.add_argument("--page-only", action="store_true",
                        help="write report.html and views.html of the finished report in OUT again, with the masking "
                             "curves, compression evaluation and atlas written into OUT since, without scoring (one "
                             "forward of the report's first window draws the views; scoring settings come from OUT's "
                             "scores.json)")
    report.set_defaults(run=_report, interrupted=common.interrupted(
        lambda args: f"the scores finished so far are in {args.out}/scores.json (\"complete\": false); the same "
                     "command resumes after the score families it finished"))

    calibrate = sub.add_parser(
        "calibrate", help="ACT head search: find heads whose calibration helps a task, write a plan",
        description="Calibrate one head at a time (ACT: sink weights x beta, freed mass to the other keys) on the "
                    "calibration split of the tasks, keep heads whose accuracy beats the unedited model by more than "
                    "--margin, and write the plan as JSON. Progress is saved after every head; run the same command "
                    "again to resume a stopped search. Multiple-choice accuracy is by choice log-probability.")
    _task_arguments(calibrate)
    common.add_output_arguments(calibrate, "plan JSON to write")
    common.add_settings(calibrate, CalibrationSettings)
    calibrate.add_argument("--progress", default=None, metavar="FILE",
                           help="progress file of the search, resumed when it exists (default OUT.progress.json)")
    calibrate.set_defaults(run=_calibrate, interrupted=common.interrupted(
        lambda args: f"the heads measured so far are in {args.progress or args.out + '.progress.json'}; run the same "
                     "command again to resume"))

    evaluate = sub.add_parser(
        "eval", help="multiple-choice accuracy with and without a plan",
        description="Accuracy of MODEL on each task's test split, without and (with --plan) with the plan's edits.")
    _task_arguments(evaluate)
    common.add_output_arguments(evaluate, "results JSON to write")
    evaluate.add_argument("--plan", default=None, metavar="PLAN", help="a plan JSON written by 'headlab calibrate' or "
                                                                       "Plan.save")
    evaluate.add_argument("--split", default="test", choices=("calibration", "test"), help="split (default test)")
    evaluate.set_defaults(run=_eval, interrupted=common.interrupted("nothing was written; run the command again"))

    view = sub.add_parser(
        "view", help="interactive attention view of a text (standalone HTML)",
        description="Record the attention of every head of MODEL on a text and write one standalone HTML page: a "
                    "layers x heads grid (coloured by a score; click a head), the head's query x key map with token "
                    "hover (texts over 512 tokens are mean-pooled into blocks and drawn as an image), and the text "
                    "coloured by the attention of a clicked query. With --compare, the map under a plan is shown "
                    "beside the original with their difference.")
    common.add_model_arguments(view)
    source = view.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to view")
    source.add_argument("--file", metavar="FILE", help="a UTF-8 file holding the text to view")
    common.add_output_arguments(view, "HTML page to write")
    common.add_settings(view, ViewSettings)
    view.add_argument("--compare", default=None, metavar="PLAN", help="a plan JSON to compare against")
    view.add_argument("--scores", default=None, metavar="SCORES", help="a report's scores.json to offer on the grid")
    view.add_argument("--export", default=None, metavar="FILE",
                      help="also write the grid (or the --head map) as a static .png, .svg or .pdf")
    view.set_defaults(run=_view, interrupted=common.interrupted("nothing was written"))

    validate = sub.add_parser(
        "validate", help="mask the top-K heads of a score vs random heads matched by layer, with tests and intervals",
        description="Masking validation of a head score from a report's scores.json, as the retrieval-head paper "
                    "tests its heads: mask the top-K heads and --random-sets random sets of K heads matched by layer "
                    "(never above --exclude-above), and measure needle recall on held-out needles and haystacks "
                    "(counting only prompts the unmasked model answers; also ROUGE-1 recall and the answer's "
                    "log-probability) for the retrieval score, next-token loss on held-out text for others. Reports "
                    "a rank test against the random sets, a paired per-prompt test and 95% bootstrap intervals. "
                    "Writes OUT/validation-SCORE.json and a plot OUT/validation-SCORE.html; a report written into the "
                    "same folder afterwards shows them. The default grid (6 needles x 3 lengths x 5 depths, 3 K x 20 "
                    "sets: up to 5,760 decodes) takes over an hour on SmolLM2-135M on two CPU cores; fewer --ks, "
                    "--needles or --needle-lengths shorten it. Each prompt's (or window's) measures are kept in "
                    "OUT/validation-SCORE.progress.json as they finish, and the same command resumes after them.")
    common.add_model_arguments(validate)
    _score_arguments(validate, "the score to validate")
    common.add_output_arguments(validate, "output folder (e.g. the report folder)")
    common.add_settings(validate, ValidationSettings)
    validate.set_defaults(run=_validate, interrupted=common.interrupted(
        lambda args: f"the prompts or windows measured so far are kept in "
                     f"{Path(args.out) / ('validation-' + _file_safe(args.score) + '.progress.json')}; the same "
                     "command resumes after them"))

    stream = sub.add_parser(
        "stream-plan", help="a plan that streams the KV heads a rule ranks lowest (KV-cache compression)",
        description="Write a plan of streaming heads (RazorAttention, DuoAttention): the --keep fraction of the KV "
                    "heads of the global-attention layers that the rule ranks highest keep the whole context; every "
                    "other KV head of those layers sees only its first --sinks tokens and a --window of latest "
                    "positions (and with --compensate one token standing for the positions it drops). Rules: a "
                    "score of --scores (a KV head scores the maximum of its query heads), 'razor' (RazorAttention: "
                    "the echo and razor_induction scores, one echo head for every 14 induction heads) or 'random' "
                    "(seeded by --seed, the control). Sliding-window layers are left as they are. Reads the model's "
                    "config only. Apply the plan with 'headlab eval --plan' or Plan.load + attach.")
    common.add_model_arguments(stream)
    _score_arguments(stream, "the rule that ranks the heads: a score's name, razor or random", required=False)
    common.add_output_arguments(stream, "plan JSON to write")
    common.add_settings(stream, StreamingSettings)
    stream.set_defaults(run=_stream_plan, interrupted=common.interrupted("nothing was written"))

    evaluation = sub.add_parser(
        "stream-eval", help="needle recall, perplexity and KV-cache bytes of streaming-head plans, per rule and "
                            "kept fraction",
        description="Evaluate KV-cache compression by streaming heads: for every --rules selection rule and every "
                    "--keeps fraction of KV heads that keep the whole context (the stream-plan of that rule), and for "
                    "the unedited model, measure needle recall on held-out prompts of every --lengths (decoded on a "
                    "cache that holds only what each head sees), perplexity on held-out windows of those lengths, and "
                    "the cache's bytes. MODEL may also be a checkpoint of 'headlab convert': it is measured as it is "
                    "(its state and window are its cache), then its --base model the same way, for comparison. Writes "
                    "compression.json and compression.html (the curves and a table); each finished run is kept in "
                    "OUT/compression.progress.json until then, and the same command resumes after it. Cost: one "
                    "prefill per prompt and condition; the defaults (3 lengths up to 4096 tokens, 20 prompts and 4 "
                    "windows each, 16 conditions) take hours on two CPU cores.")
    common.add_model_arguments(evaluation)
    evaluation.add_argument("--scores", metavar="SCORES", action="append",
                            help="a scores file (a report's scores.json, train-gates' gates.json) for the rules that "
                                 "are scores, and razor; repeat to read several")
    evaluation.add_argument("--base", metavar="MODEL",
                            help="for a converted checkpoint: the model it was converted from, measured on the same "
                                 "prompts (default: the one its conversion recorded; 'none': the checkpoint alone)")
    common.add_output_arguments(evaluation, "output folder (e.g. the report folder)")
    common.add_settings(evaluation, CompressionSettings)
    evaluation.set_defaults(run=_stream_eval, interrupted=common.interrupted(
        lambda args: f"the runs measured so far are kept in {Path(args.out) / PROGRESS_FILE}; the same command "
                     "resumes after them"))

    gates = sub.add_parser(
        "train-gates", help="train DuoAttention's gates: which KV heads need the whole context",
        description="Train DuoAttention's gate per KV head of the global-attention layers: each head's output mixes "
                    "full and streaming attention (--sinks first tokens, --window latest positions) by its gate, and "
                    "only the gates learn, on synthetic passkey samples built offline from --text-file, so that the "
                    "final hidden states at the answer stay the unedited model's, with a penalty --lam on the mean "
                    "gate. Writes gates.json (a scores file with the duo_gate score, for stream-plan and stream-eval) "
                    "and plan.json (the KV heads with a gate of at least 0.5 keep the whole context). The training "
                    "state is saved every --save-every steps; the same command resumes a killed run. Cost: one "
                    "forward and backward of the sample per step; the published 2000 steps of 1,000-32,000 tokens "
                    "take days on a CPU, so shorten --steps and --max-length there.")
    common.add_model_arguments(gates)
    common.add_output_arguments(gates, "output folder")
    common.add_settings(gates, GateSettings)
    gates.set_defaults(run=_train_gates, interrupted=common.interrupted(
        "the training state saved last is kept; the same command resumes from it"))

    atlas = sub.add_parser(
        "atlas", help="every head's attention pattern in one map, clustered; compare two models or a plan",
        description="Describe every head of MODEL by its attention pattern on --samples windows of text (mass by "
                    "distance in log-spaced bins, first-token and hidden-sink mass, the distribution of row "
                    "entropies, a 32x32 pooled map), embed all heads in 2D (a small autoencoder, PCA and t-SNE), "
                    "cluster them (k-means on the autoencoder's code) and name each cluster by its dominant "
                    "pattern. With MODEL2, or with --compare PLAN (the same model before and after the plan), both "
                    "share one embedding; with a plan each head's move is drawn. Writes atlas.json and atlas.html "
                    "(hover a head for its pooled map; with views.html beside it, click to open the head there). "
                    "Written into a report folder, the report shows the atlas too.")
    common.add_model_arguments(atlas)
    atlas.add_argument("model2", nargs="?", metavar="MODEL2", help="a second model to embed with the first")
    atlas.add_argument("--compare", metavar="PLAN", help="a plan file: embed MODEL before and after it")
    atlas.add_argument("--scores", metavar="SCORES", help="a report's scores.json of MODEL, to colour the heads by")
    common.add_output_arguments(atlas, "output folder (e.g. the report folder)")
    common.add_settings(atlas, AtlasSettings)
    atlas.set_defaults(run=_atlas, interrupted=common.interrupted("nothing was written"))

    sae_cli.add_parser(sub)
    convert_cli.add_parser(sub)
    for name, subparser in sub.choices.items():
        subparser.set_defaults(prog=subparser.prog)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``headlab`` command."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _headlab_warnings_in_one_line(warnings.formatwarning)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"\n{args.prog}: interrupted; {args.interrupted(args)}", file=sys.stderr)
        return 130
    except HeadlabError as err:
        print(f"{args.prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _headlab_warnings_in_one_line(format_warning):
    """A ``warnings.formatwarning`` that prints headlab's own warnings (``"headlab: ..."``) as their
    line alone, and others as ``format_warning`` does."""
    if getattr(format_warning, "headlab", False):
        return format_warning

    def formatted(message, category, filename, lineno, line=None):
        if str(message).startswith("headlab: "):
            return f"{message}\n"
        return format_warning(message, category, filename, lineno, line)

    formatted.headlab = True
    return formatted


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
