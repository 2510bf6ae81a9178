"""``headlab calibrate``: ACT's head search, written as a plan."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import HeadlabError
from ..core.files import claim_file
from ..core.kinds import index_spans
from ..core.settings import settings_from_args
from ..surgeon.search.settings import CalibrationSettings
from ..surgeon.search.tasks import TaskSettings
from . import common
from .base import Command, register_command


@register_command
class Calibrate(Command):
    name = "calibrate"
    help = "ACT head search: find heads whose calibration helps a task, write a plan"
    description = ("Calibrate one head at a time (ACT: sink weights x beta, freed mass to the other keys) on the "
                   "calibration split of the tasks, keep heads whose accuracy beats the unedited model by more than "
                   "--margin, and write the plan as JSON. Multiple-choice accuracy is by choice log-probability. "
                   "Cost at the defaults: one scoring pass of the calibration split per candidate head (every head "
                   "of layers 2 to the second-to-last: 243 heads of SmolLM2-135M, about an hour on two CPU cores; "
                   "--layers 10-12 --size 20: a few minutes). Progress is saved after every head; the same command "
                   "resumes a stopped search.")
    example = "{model} --task kv-recall --size 8 --layers 2 --out {out}/plan.json"
    output = "plan JSON to write"
    settings = (TaskSettings, CalibrationSettings)

    def arguments(self, parser) -> None:
        parser.add_argument("--progress", default=None, metavar="FILE",
                            help="progress file of the search, resumed when it exists (default OUT.progress.json)")

    def check(self, args):
        from ..surgeon.edits.base import FIRST_EDITABLE_LAYER

        tasks, search = settings_from_args(TaskSettings, args), settings_from_args(CalibrationSettings, args)
        claim_file(args.out, args.overwrite, "--out plan")
        progress = self._progress(args)
        claim_file(progress, args.overwrite, "--progress file")
        examples = tasks.examples("calibration")
        config = common.model_config(args, causal=True, needs="the calibration search")
        layers = common.layers_of(search.layers, common.model_shape_of(config).n_layers, "--layers")
        if layers is not None and min(layers) < FIRST_EDITABLE_LAYER:
            raise HeadlabError(f"--layers: layers 0-{FIRST_EDITABLE_LAYER - 1} are never calibrated (ACT)")
        converted = sorted(set(layers or ()) & set(common.converted_layers_of(args.model, config)))
        if converted:
            named = f"layer {converted[0]} is" if len(converted) == 1 else f"layers {index_spans(converted)} are"
            raise HeadlabError(f"--layers: {named} converted to linear attention, which has no sinks to calibrate")
        from ..core.journal import Journal
        from ..surgeon.search.calibration import SearchSettings, candidates_of, search_identity

        candidates = candidates_of(common.model_shape_of(config), set(common.converted_layers_of(args.model, config)),
                                   layers)
        record = SearchSettings(tasks.tasks, len(examples), tuple(candidates), search.beta, search.threshold,
                                search.margin)
        Journal(progress, search_identity(record, examples, args.model), "calibration")  # not another search's
        return tasks, record, examples, progress

    def need(self, args, checked):
        from ..core.resources import Forward

        tasks, examples = checked[0], checked[2]  # (tasks, search record, examples, progress)
        shape = common.model_shape_of(common.model_config(args))
        return common.need(args, [Forward(common.longest_example(examples), tasks.batch_size, maps=shape.n_heads)],
                           "--batch-size")

    def run(self, args, checked) -> int:
        from ..surgeon.search.calibration import calibration_search, plan_from_search

        tasks, record, examples, progress = checked
        model, tokenizer = common.load_model_from(args)
        state = calibration_search(model, tokenizer, examples, record, progress, tasks.batch_size, model_id=args.model)
        plan = plan_from_search(model, args.model, state, record.beta, record.threshold)
        plan.save(args.out)
        print(f"baseline accuracy {state['baseline']:.3f} on {len(examples)} calibration examples; "
              f"kept {len(state['kept'])} of {len(record.candidates)} heads\nplan: {args.out}\nprogress: {progress}")
        if not state["kept"]:
            print(f"headlab calibrate: warning: no head beat the unedited model by more than --margin "
                  f"{record.margin} on {len(examples)} examples, so the plan is empty; try a smaller --margin, a "
                  "larger --size, other --layers or another --beta", file=sys.stderr)
        return 0

    def interrupted(self, args) -> str:
        return f"the heads measured so far are in {self._progress(args)}; run the same command again to resume"

    @staticmethod
    def _progress(args) -> Path:
        return Path(args.progress or f"{args.out}.progress.json")
