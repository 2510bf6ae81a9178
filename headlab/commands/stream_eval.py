"""``headlab stream-eval``: needle recall, perplexity and cache bytes of KV-cache compression."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import HeadlabError
from ..core.files import check_folder
from ..core.settings import settings_from_args
from ..probes.compression.settings import PROGRESS_FILE, CompressionSettings
from . import common
from .base import Command, register_command


@register_command
class StreamEval(Command):
    name = "stream-eval"
    help = "needle recall, perplexity and KV-cache bytes of streaming heads and presses, against the cache kept"
    description = ("Evaluate KV-cache compression by streaming heads: for every --rules selection rule and every "
                   "--keeps fraction of KV heads that keep the whole context (the stream-plan of that rule), and for "
                   "the unedited model, measure needle recall on held-out prompts of every --lengths (decoded on a "
                   "cache that holds only what each head sees), perplexity on held-out windows of those lengths, and "
                   "the cache's bytes; with --scorers, the same for presses (token scorers compressing a real cache, "
                   "per head: --allocations, whole-head --hybrids, --modes query-agnostic or query-aware) at every "
                   "--budgets fraction of the cache's bytes, so every condition sits on one axis of bytes kept. MODEL may also be a checkpoint of 'headlab convert': it is measured as it is "
                   "(its state and window are its cache), then its --base model the same way, for comparison. Writes "
                   "compression.json and compression.html (the curves and a table); each finished run is kept in "
                   "OUT/compression.progress.json until then, and the same command resumes after it. Cost: one "
                   "prefill per prompt and condition; the defaults (3 lengths up to 4096 tokens, 20 prompts and 4 "
                   "windows each, 16 conditions) take hours on two CPU cores (--rules random --keeps 0.5 --lengths "
                   "512 --needles 1: a few minutes).")
    example = ("{model} --rules random --keeps 0.5 --random-sets 1 --lengths 256 --window 64 --needles 1 "
                "--needle-depths 0.5 --windows 1 --out {out}")
    output = "output folder (e.g. the report folder)"
    settings = (CompressionSettings,)

    def arguments(self, parser) -> None:
        parser.add_argument("--scores", metavar="SCORES", action="append",
                            help="a scores file (a report's scores.json, train-gates' gates.json) for the rules that "
                                 "are scores, and razor; repeat to read several")
        parser.add_argument("--base", metavar="MODEL",
                            help="for a converted checkpoint: the model it was converted from, measured on the same "
                                 "prompts (default: the one its conversion recorded; 'none': the checkpoint alone)")

    def check(self, args):
        from ..core.journal import Journal
        from ..probes.compression import run

        settings = settings_from_args(CompressionSettings, args)
        out = Path(args.out)
        check_folder(out, args.overwrite, "--out folder")
        from ..probes.figures import check_plotly_source  # plotly.js beside the pages: checked before any work
        check_plotly_source(out)
        config = common.model_config(args, causal=True, needs="needle recall and perplexity")
        if common.converted_layers_of(args.model, config):
            self._refuse_streaming_options(args)
            base = run.conversion_base(args.model, args.base, lambda spec, needs: common.model_config(
                args, spec, causal=True, needs=needs))
            Journal(out / PROGRESS_FILE, run.conversion_identity(settings, args.model, base), "compression")
            return settings, None, base, True
        if args.base is not None:
            raise HeadlabError(f"--base is for a checkpoint converted to linear attention; {args.model} is not one")
        from ..core.head_scores import merged_scores
        from ..surgeon.streaming.rules import rule_scores

        shape = common.model_shape_of(config)
        from ..probes.compression.pressing import press_rules

        needed = {name for rule in (*settings.rules, *press_rules(settings)) for name in rule_scores(rule)}
        scores = merged_scores(args.scores, shape, needed) if args.scores else None
        if scores:
            common.check_scores_model(scores, needed, args.model)
        layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
        measured = run.conditions(shape, scores, settings, layer_types, args.model, config)  # fails here on a rule
        # without its scores, or a budget below the sinks and window
        Journal(out / PROGRESS_FILE, run.streaming_identity(measured, settings, args.model), "compression")
        return settings, scores, None, False

    @staticmethod
    def _refuse_streaming_options(args) -> None:
        """A converted checkpoint is measured as it is: streaming-head options do not apply."""
        import dataclasses

        from ..core.settings import given_flags
        from ..probes.compression.run import STREAMING_ONLY

        flags = {f.metadata["option"].flag for f in dataclasses.fields(CompressionSettings) if f.name in STREAMING_ONLY}
        refused = [flag for flag in given_flags(CompressionSettings, args) if flag in flags]
        refused += ["--scores"] if args.scores else []
        if refused:
            raise HeadlabError(f"{args.model} is converted to linear attention: stream-eval measures it as it is "
                               f"against its base model, and {', '.join(refused)} (streaming heads) do not apply")

    def need(self, args, checked):
        from ..core.resources import Forward

        settings = checked[0]
        return common.need(args, [Forward(max(settings.lengths), maps=1)], "--lengths")

    def run(self, args, checked) -> int:
        from ..probes.compression.page import summary_lines, write_compression
        from ..probes.compression.run import evaluate_compression, evaluate_conversion

        settings, scores, base, converted = checked
        journal = Path(args.out) / PROGRESS_FILE
        if converted:
            result = evaluate_conversion(args.model, base, settings, journal, args.max_memory)
        else:
            model, tokenizer = common.load_model_from(args)
            result = evaluate_compression(model, tokenizer, scores, settings, model_id=args.model,
                                          journal_path=journal)
        written = write_compression(args.out, result, args.overwrite)
        print(summary_lines(result))
        print(f"written: {written} and compression.html")
        return 0

    def interrupted(self, args) -> str:
        return f"the runs measured so far are kept in {Path(args.out) / PROGRESS_FILE}; the same command resumes " \
               "after them"
