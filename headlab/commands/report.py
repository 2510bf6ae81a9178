"""``headlab report``: score every head and write a head-importance report."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import HeadlabError
from ..core.files import check_folder
from ..core.settings import settings_from_args
from ..probes.report.settings import ReportSettings
from . import common
from .base import Command, register_command


@register_command
class Report(Command):
    name = "report"
    help = "score every head and write a head-importance report"
    description = ("Score every attention head of MODEL on real text (sink, entropy, previous-token and confidence "
                   "scores from exact attention maps, or from streamed statistics for long windows; the score "
                   "--families; with --probe-data, linear-probe accuracy of each head) and write OUT/report.html "
                   "(opens offline; plotly.js in one file beside the pages), OUT/scores.json and OUT/scores.csv. Cost at the defaults: about "
                   "2-5 minutes for SmolLM2-135M on two CPU cores, most of it the retrieval family's needle runs "
                   "at 4,096 tokens (--families none: about 10 s). A stopped report resumes after the families it "
                   "finished.")
    example = "{model} --families induction --windows 4 --tokens 128 --out {out}"
    output = "output folder (created if missing; new, empty or headlab's own)"
    settings = (ReportSettings,)
    renamed = {"--scores": "--families"}

    def arguments(self, parser) -> None:
        parser.add_argument("--page-only", action="store_true",
                            help="write report.html and views.html of the finished report in OUT again, with the "
                                 "masking curves, compression evaluation and atlas written into OUT since, without "
                                 "scoring (one forward of the report's first window draws the views; scoring "
                                 "settings come from OUT's scores.json)")

    def check(self, args):
        from ..probes.atlas.page import load_atlas
        from ..probes.compression.file import load_compression
        from ..probes.validation.file import load_curves

        settings = settings_from_args(ReportSettings, args)
        if args.page_only:
            return self._check_pages(args, settings)
        check_folder(args.out, args.overwrite, "--out report folder")
        load_curves(args.out)
        load_compression(args.out)
        load_atlas(args.out)
        config = common.model_config(args)
        common.check_window_fits(config, settings.text.tokens, "--tokens")
        from ..probes.report.scoring import check_converted_windows
        from ..probes.scorers.families import requested_families
        from ..surgeon.conversion.converted import is_converted_directory
        from ..surgeon.models import is_causal_lm

        converted = Path(args.model).is_dir() and is_converted_directory(args.model)
        if converted:
            check_converted_windows(config, settings.text.tokens)
        for name, reason in requested_families(settings, is_causal_lm(config), converted)[1].items():
            print(f"headlab report: note: skipping the {name} score of {args.model}: it {reason}", file=sys.stderr)
        return settings

    def _check_pages(self, args, settings):
        """``--page-only``: the folder's finished report, its other files and the model, checked."""
        from ..core.settings import given_flags
        from ..probes.atlas.page import load_atlas
        from ..probes.compression.file import load_compression
        from ..probes.report.scoring import finished_report
        from ..probes.validation.file import load_curves

        ignored = [flag for flag in given_flags(ReportSettings, args) if flag != "--views"]
        if ignored or args.overwrite:
            raise HeadlabError("--page-only writes the pages from the folder's scores.json as they were scored: it "
                               f"takes --views, not {', '.join(ignored + ['--overwrite'] * args.overwrite)}")
        if not (Path(args.out) / "scores.json").is_file():
            raise HeadlabError(f"{args.out} holds no scores.json: --page-only rewrites the pages of a finished report")
        finished_report(Path(args.out), args.model)
        load_curves(args.out)
        load_compression(args.out)
        load_atlas(args.out)
        check_folder(args.out, False, "--out report folder")
        common.model_config(args)
        return settings

    def need(self, args, settings):
        if args.page_only:
            return None
        from ..core.resources import Forward

        shape = common.model_shape_of(common.model_config(args))
        longest = max((settings.needles.lengths if "retrieval" in settings.families else ()), default=0)
        return common.need(args, [Forward(settings.text.tokens, grad="gradient" in settings.families, recompute=True,
                                          maps=shape.n_heads), Forward(longest, logits="last")],
                           "--tokens or --needle-lengths")

    def run(self, args, settings) -> int:
        from ..core.distributed import init_distributed

        if args.page_only:
            from ..probes.report.scoring import rewrite_report_pages

            model, tokenizer = common.load_model_from(args)
            path = rewrite_report_pages(model, tokenizer, args.model, args.out, settings.n_views, settings.top_k)
            print(f"report: {path} (pages written again from {path.parent / 'scores.json'})")
            return 0
        init_distributed()
        model, tokenizer = common.load_model_from(args)
        from ..probes.report.scoring import write_report

        path = write_report(model, tokenizer, args.model, args.out, settings, overwrite=args.overwrite)
        if path is None:  # a rank other than 0 of a torchrun job
            return 0
        print(f"report: {path}\nscores: {path.parent / 'scores.json'}, {path.parent / 'scores.csv'}")
        return 0

    def interrupted(self, args) -> str:
        return (f"the scores finished so far are in {args.out}/scores.json (\"complete\": false); the same command "
                "resumes after the score families it finished")
