"""``headlab validate``: mask a score's top-K heads against random heads matched by layer."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ModelSpecError
from ..core.files import check_folder
from ..core.settings import settings_from_args
from ..probes.validation.settings import ValidationSettings
from . import common
from .base import Command, register_command


def score_arguments(parser, what: str, required: bool = True) -> None:
    """``--scores`` (a report's scores.json) and ``--score`` (one of its scores, default retrieval)."""
    parser.add_argument("--scores", required=required, metavar="SCORES",
                        help="a report's scores.json" + ("" if required else " (not needed by the random rule)"))
    parser.add_argument("--score", default="retrieval", help=f"{what} (default retrieval)")


@register_command
class Validate(Command):
    name = "validate"
    help = "mask the top-K heads of a score vs random heads matched by layer, with tests and intervals"
    description = ("Masking validation of a head score from a report's scores.json, as the retrieval-head paper tests "
                   "its heads: mask the top-K heads and --random-sets random sets of K heads matched by layer (never "
                   "above --exclude-above), and measure needle recall on held-out needles and haystacks (counting "
                   "only prompts the unmasked model answers; also ROUGE-1 recall and the answer's log-probability) "
                   "for the retrieval score, next-token loss on held-out text for others. Reports a rank test "
                   "against the random sets, a paired per-prompt test and 95% bootstrap intervals. Writes "
                   "OUT/validation-SCORE.json and a plot OUT/validation-SCORE.html; a report written into the same "
                   "folder afterwards shows them. Cost at the defaults (6 needles x 3 lengths x 5 depths, 3 K x 20 "
                   "sets: up to 5,760 decodes): over an hour on SmolLM2-135M on two CPU cores; fewer --ks, --needles "
                   "or --needle-lengths shorten it (--ks 5 --random-sets 5 --needles 1 --needle-lengths 512: a few "
                   "minutes). Each prompt's (or window's) measures are kept in OUT/validation-SCORE.progress.json "
                   "as they finish, and the same command resumes after them.")
    example = ("{model} --scores {scores} --score retrieval --metric loss --ks 2 --random-sets 3 --windows 4 "
                "--tokens 128 --out {out}")
    output = "output folder (e.g. the report folder)"
    settings = (ValidationSettings,)

    def arguments(self, parser) -> None:
        score_arguments(parser, "the score to validate")

    def check(self, args):
        from ..core.head_scores import chosen_score
        from ..core.journal import Journal
        from ..probes.validation.run import validation_identity
        from ..surgeon.models import is_causal_lm

        settings = settings_from_args(ValidationSettings, args)
        config = common.model_config(args)
        common.refuse_converted(args, config, "the masking validation")
        score = chosen_score(args.scores, args.score, common.model_shape_of(config))
        common.check_scores_model({score.name: score}, {score.name}, args.model)
        metric = settings.masking.metric or ("needle-recall" if args.score == "retrieval" else "loss")
        check_folder(args.out, args.overwrite, "--out folder")
        from ..probes.figures import check_plotly_source  # plotly.js beside the pages: checked before any work
        check_plotly_source(args.out)
        if metric == "needle-recall" and not is_causal_lm(config):
            raise ModelSpecError(f"{args.model} is not a causal language model; needle recall needs one (use "
                                 "--metric loss)")
        progress = self._progress(args)
        Journal(progress, validation_identity(score, settings, args.model), "validation")  # not another validation's
        return settings, score, progress

    def need(self, args, checked):
        from ..core.resources import Forward

        settings = checked[0]
        shape = common.model_shape_of(common.model_config(args))
        return common.need(args, [Forward(max(settings.needle_lengths), maps=shape.n_heads, logits="last"),
                                  Forward(settings.text.tokens, maps=shape.n_heads)], "--needle-lengths or --tokens")

    def run(self, args, checked) -> int:
        from ..probes.validation.page import curve_lines, write_validation
        from ..probes.validation.run import validate_score

        settings, score, progress = checked
        model, tokenizer = common.load_model_from(args)
        curve = validate_score(model, tokenizer, score, settings, model_id=args.model, journal_path=progress)
        written = write_validation(args.out, curve, args.overwrite)
        print(curve_lines(curve))
        print(f"written: {written} and {written.with_suffix('.html').name}")
        return 0

    def interrupted(self, args) -> str:
        return f"the prompts or windows measured so far are kept in {self._progress(args)}; the same command resumes " \
               "after them"

    @staticmethod
    def _progress(args) -> Path:
        return Path(args.out) / f"validation-{common.file_safe(args.score)}.progress.json"
