"""``headlab eval``: multiple-choice accuracy with and without a plan."""

from __future__ import annotations

import sys

from ..core.files import claim_file, write_json
from ..core.settings import settings_from_args
from ..surgeon.search.tasks import TaskSettings
from . import common
from .base import Command, register_command


@register_command
class Eval(Command):
    name = "eval"
    help = "multiple-choice accuracy with and without a plan"
    description = ("Accuracy of MODEL on each task's test split, without and (with --plan) with the plan's edits, "
                   "as JSON. Cost: one scoring pass per task and condition (seconds to minutes for SmolLM2-135M on "
                   "two CPU cores at the default --size).")
    example = "{model} --task kv-recall --size 8 --plan {plan} --out {out}/eval.json"
    output = "results JSON to write"
    settings = (TaskSettings,)

    def arguments(self, parser) -> None:
        parser.add_argument("--plan", default=None, metavar="PLAN",
                            help="a plan JSON written by 'headlab calibrate', 'headlab stream-plan' or Plan.save")
        parser.add_argument("--split", default="test", choices=("calibration", "test"), help="split (default test)")

    def check(self, args):
        from ..surgeon.plan import Plan

        tasks = settings_from_args(TaskSettings, args)
        claim_file(args.out, args.overwrite, "--out results")
        plan = Plan.load(args.plan) if args.plan else None
        examples = {task: TaskSettings(tasks=(task,), size=tasks.size, seed=tasks.seed).examples(args.split)
                    for task in tasks.tasks}
        config = common.model_config(args, causal=True, needs="task evaluation")
        if plan is not None:
            plan.validate(common.model_shape_of(config))
        return tasks, plan, examples

    def need(self, args, checked):
        from ..core.resources import Forward

        tasks, plan, examples = checked
        shape = common.model_shape_of(common.model_config(args))
        return common.need(args, [Forward(common.longest_example(examples), tasks.batch_size,
                                          maps=shape.n_heads if plan else 0)], "--batch-size")

    def run(self, args, checked) -> int:
        from ..surgeon.search.accuracy import evaluate_tasks

        tasks, plan, examples = checked
        if plan is not None and not plan.edits:
            print(f"headlab eval: warning: plan {args.plan} has no edits, so 'with the plan' is the unedited model",
                  file=sys.stderr)
        model, tokenizer = common.load_model_from(args)
        results = evaluate_tasks(model, tokenizer, examples, plan, tasks.batch_size)
        results.update({"model": args.model, "plan": args.plan, "split": args.split, "seed": tasks.seed})
        for task, row in results["tasks"].items():
            summary = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in row.items())
            print(f"{task}: {summary} (n={len(examples[task])})")
        write_json(args.out, results)
        print(f"results: {args.out}")
        return 0
