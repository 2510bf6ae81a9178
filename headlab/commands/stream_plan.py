"""``headlab stream-plan``: a plan that streams the KV heads a rule ranks lowest."""

from __future__ import annotations

from ..core.files import claim_file
from ..core.settings import settings_from_args
from ..surgeon.streaming.settings import StreamingSettings
from . import common
from .base import Command, register_command
from .validate import score_arguments


@register_command
class StreamPlan(Command):
    name = "stream-plan"
    help = "a plan that streams the KV heads a rule ranks lowest (KV-cache compression)"
    description = ("Write a plan of streaming heads (RazorAttention, DuoAttention): the --keep fraction of the KV "
                   "heads of the global-attention layers that the rule ranks highest keep the whole context; every "
                   "other KV head of those layers sees only its first --sinks tokens and a --window of latest "
                   "positions (and with --compensate one token standing for the positions it drops). Rules: a score "
                   "of --scores (a KV head scores the maximum of its query heads), 'razor' (RazorAttention: the echo "
                   "and razor_induction scores, one echo head for every 14 induction heads) or 'random' (seeded by "
                   "--seed, the control). Sliding-window layers are left as they are. Cost: the model's config only "
                   "(under a second). Apply the plan with 'headlab eval --plan' or Plan.load + attach.")
    example = "{model} --scores {scores} --score retrieval --keep 0.5 --out {out}/stream.json"
    output = "plan JSON to write"
    settings = (StreamingSettings,)

    def arguments(self, parser) -> None:
        score_arguments(parser, "the rule that ranks the heads: a score's name, razor or random", required=False)

    def check(self, args):
        from ..core.head_scores import load_scores_file
        from ..surgeon.streaming.rules import rule_ranking

        settings = settings_from_args(StreamingSettings, args)
        claim_file(args.out, args.overwrite, "--out plan")
        config = common.model_config(args, causal=True, needs="a plan of streaming heads")
        common.refuse_converted(args, config, "a plan of streaming heads")
        shape = common.model_shape_of(config)
        scores = load_scores_file(args.scores, shape) if args.scores else None
        if scores:
            common.check_scores_model(scores, {args.score}, args.model)
        layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
        return settings, shape, layer_types, rule_ranking(args.score, scores, shape, layer_types, settings.seed)

    def run(self, args, checked) -> int:
        from ..surgeon.streaming.rules import candidates, streaming_plan

        settings, shape, layer_types, ranking = checked
        plan = streaming_plan(ranking, shape, settings, model_id=args.model)
        plan.save(args.out)
        total = len(candidates(shape, layer_types))
        streaming = sum(len(edit.heads) for edit in plan.edits) // shape.group_size
        print(f"{total - streaming} of {total} KV heads of the global-attention layers keep the whole context (rule "
              f"{args.score}); {streaming} stream with {settings.sinks} sink tokens and a {settings.window}-position "
              f"window{' and a compensation token' if settings.compensate else ''}\nplan: {args.out}")
        return 0
