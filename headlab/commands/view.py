"""``headlab view``: an interactive attention view of a text (an HTML page)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import HeadlabError, InputFileError
from ..core.files import claim_file, read_text_file
from ..core.settings import settings_from_args
from ..probes.views.settings import ViewSettings
from . import common
from .base import Command, register_command


@register_command
class View(Command):
    name = "view"
    help = "interactive attention view of a text (an HTML page)"
    description = ("Record the attention of every head of MODEL on a text and write one HTML page (plotly.js beside "
                   "it, see --plotlyjs): a layers x heads grid (coloured by a score; click a head), the head's query x "
                   "key map with token hover, the first token hidden or a log colour scale at a click (texts over "
                   "512 tokens are mean-pooled into blocks and drawn as an image), and the text "
                   "coloured by the attention of a clicked query. With --compare, the map under a plan is shown "
                   "beside the original with their difference. Cost: one forward of the text per layer group "
                   "(seconds for SmolLM2-135M at 1,000 tokens on two CPU cores).")
    example = "{model} --text-file {text} --out {out}/view.html"
    output = "HTML page to write"
    settings = (ViewSettings,)

    def arguments(self, parser) -> None:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--text", help="the text to view")
        source.add_argument("--text-file", metavar="FILE", help="a UTF-8 file holding the text to view")
        parser.add_argument("--compare", default=None, metavar="PLAN", help="a plan JSON to compare against")
        parser.add_argument("--scores", default=None, metavar="SCORES", help="a report's scores.json to offer on the "
                                                                              "grid")
        parser.add_argument("--export", default=None, metavar="FILE",
                            help="also write the grid (or the --head map) as a static .png, .svg or .pdf")

    def check(self, args):
        from ..core.head_scores import load_scores_file
        from ..surgeon.plan import Plan

        view = settings_from_args(ViewSettings, args)
        claim_file(args.out, args.overwrite, "--out page")
        from ..probes.figures import check_plotly_source  # plotly.js beside the pages: checked before any work
        check_plotly_source(Path(args.out).parent, view.plotlyjs)
        if args.export:
            if Path(args.export).suffix.lower() not in (".png", ".svg", ".pdf"):
                raise HeadlabError(f"--export {args.export}: the figure must be a .png, .svg or .pdf file")
            claim_file(args.export, args.overwrite, "--export figure")
        text = args.text if args.text is not None else read_text_file(args.text_file, "--text-file")
        if not text.strip():
            raise InputFileError("the text to view is empty")
        plan = Plan.load(args.compare) if args.compare else None
        shape = common.model_shape_of(common.model_config(args))
        if plan is not None:
            plan.validate(shape)
        scores = load_scores_file(args.scores, shape) if args.scores else None
        if scores:
            common.check_scores_model(scores, set(scores), args.model)
        layers = common.layers_of(view.layers, shape.n_layers, "--layers")
        head = None
        if view.head is not None:
            head = (common.layers_of((view.head[0],), shape.n_layers, "--head")[0], view.head[1])
            if head[1] >= shape.n_heads:
                raise HeadlabError(f"--head: the model's heads are 0..{shape.n_heads - 1}, not {head[1]}")
            if layers is not None and head[0] not in layers:
                raise HeadlabError(f"--head {head[0]}.{head[1]} is on a layer --layers does not record")
        return view, text, plan, scores, layers, head

    def need(self, args, checked):
        from ..core.resources import Forward

        view, text, plan = checked[:3]
        shape = common.model_shape_of(common.model_config(args))
        tokens = min(view.max_tokens, len(text.encode("utf-8")) + 2)  # a token is at least one byte
        return common.need(args, [Forward(tokens, maps=shape.n_heads * (2 if plan else 1), logits="all")],
                           "the text's length or --max-tokens")

    def run(self, args, checked) -> int:
        view, text, plan, scores, layers, head = checked
        model, tokenizer = common.load_model_from(args)
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] > view.max_tokens:
            raise HeadlabError(f"the text is {ids.shape[1]} tokens, more than --max-tokens {view.max_tokens}; "
                               "shorten it or raise the limit")
        from ..probes.views.data import gather_view
        from ..probes.views.page import write_view

        data = gather_view(model, tokenizer, ids, args.model, layers, plan, int(view.max_payload_mb * 2**20),
                           plan_label=Path(args.compare).name if plan else None)
        path = write_view(data, args.out, scores, head, view.plotlyjs, overwrite=args.overwrite)
        tokens = f"{len(data.tokens)} token{'s' if len(data.tokens) != 1 else ''}"
        print(f"view: {path} ({path.stat().st_size / 2**20:.1f} MiB, {tokens}, "
              f"{'one cell per token' if data.block == 1 else f'{data.block}-token blocks'})")
        if args.export:
            from ..probes.figures import export_figure
            from ..probes.views.figure import view as view_figure

            shown = view_figure(data, *head) if head else view_figure(data, scores=scores)
            print(f"figure: {export_figure(shown, args.export)}")
        return 0
