"""``headlab apply``: a plan written into a checkpoint that reloads as the edited model."""

from __future__ import annotations

from ..core.errors import HeadlabError
from ..core.files import check_folder
from . import common
from .base import Command, register_command


@register_command
class Apply(Command):
    name = "apply"
    help = "write MODEL edited by a plan as a checkpoint that reloads edited"
    description = ("Write MODEL edited by PLAN into the folder --out. Edits that are fixed maps of head outputs "
                   "(head scaling, ablation, mean replacement) are folded into the output projections' weights: "
                   "the folder is then a plain Hugging Face checkpoint that transformers loads without headlab, "
                   "checked against the live plan before it is moved into place. A plan with edits that read the "
                   "input (calibration, steering, streaming, redistribution) is saved as the unedited model under "
                   "base/ with plan.json; headlab's load_model(DIR) (and every headlab command given DIR) reloads it "
                   "with the plan installed. Cost: loading and writing the model, plus one reload and forward to "
                   "check folded weights (seconds for SmolLM2-135M on two CPU cores; the folder takes the model's "
                   "size on disk).")
    example = "{model} --plan {plan} --out {out}/edited"
    output = "checkpoint folder to write"
    max_memory = False

    def arguments(self, parser) -> None:
        parser.add_argument("--plan", required=True, metavar="PLAN",
                            help="a plan JSON written by 'headlab calibrate', 'headlab stream-plan' or Plan.save")

    def check(self, args):
        from ..surgeon.plan import Plan

        plan = Plan.load(args.plan)
        if not plan.edits:
            raise HeadlabError(f"plan {args.plan} has no edits, so the checkpoint would be the model itself")
        config = common.model_config(args)
        common.refuse_converted(args, config, "apply")
        plan.validate(common.model_shape_of(config))
        check_folder(args.out, args.overwrite, "--out checkpoint folder")
        return plan

    def need(self, args, plan):
        from ..core.resources import Forward

        return common.need(args, [Forward(64)], "nothing of this command (the model itself does not fit)",
                           disk={args.out: 2 * common.checkpoint_bytes(args)})  # the folded weights, or the base

    def run(self, args, plan) -> int:
        from ..surgeon.models import load_model
        from ..surgeon.saving import save_edited

        model, tokenizer = load_model(args.model)
        print(f"writing {len(plan.edits)} edits of {args.plan} into {args.out} ...", flush=True)
        saved = save_edited(model, tokenizer, plan, args.out, overwrite=args.overwrite,
                            provenance={"plan_file": str(args.plan)})
        if saved.layout == "folded":
            print(f"folded all {len(saved.folded)} edits into the weights (largest logit difference from the live "
                  f"plan {saved.max_logit_difference:.2g}); transformers loads {args.out} as it is")
        else:
            print(f"saved the unedited model and the plan ({len(saved.kept.edits)} edits), as some cannot fold into "
                  f"the weights; headlab.load_model('{args.out}') reloads it edited")
            for reason in saved.reasons:
                print(f"  {reason}")
        print(f"checkpoint: {args.out}")
        return 0

    def interrupted(self, args) -> str:
        return f"{args.out} is not a checkpoint until it holds headlab_edit.json; run the same command again"
