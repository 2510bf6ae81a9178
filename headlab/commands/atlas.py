"""``headlab atlas``: every head's attention pattern in one map, clustered; two models or a plan compared."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..core.errors import HeadlabError
from ..core.files import check_folder
from ..core.settings import settings_from_args
from ..probes.atlas.settings import AtlasSettings
from . import common
from .base import Command, register_command


@register_command
class Atlas(Command):
    name = "atlas"
    help = "every head's attention pattern in one map, clustered; compare two models or a plan"
    description = ("Describe every head of MODEL by its attention pattern on --windows windows of text (mass by "
                   "distance in log-spaced bins, first-token and hidden-sink mass, the distribution of row entropies, "
                   "a 32x32 pooled map), embed all heads in 2D (a small autoencoder, PCA and t-SNE), cluster them "
                   "(k-means on the autoencoder's code) and name each cluster by its dominant pattern. With MODEL2, "
                   "or with --compare PLAN (the same model before and after the plan), both share one embedding; "
                   "with a plan each head's move is drawn. Writes atlas.json and atlas.html (hover a head for its "
                   "pooled map; with views.html beside it, click to open the head there). Written into a report "
                   "folder, the report shows the atlas too. Cost at the defaults: about a minute for SmolLM2-135M "
                   "on two CPU cores (one forward per window and model).")
    example = "{model} --windows 2 --tokens 128 --clusters 3 --out {out}"
    output = "output folder (e.g. the report folder)"
    settings = (AtlasSettings,)

    def arguments(self, parser) -> None:
        parser.add_argument("model2", nargs="?", metavar="MODEL2", help="a second model to embed with the first")
        parser.add_argument("--compare", metavar="PLAN", help="a plan file: embed MODEL before and after it")
        parser.add_argument("--scores", metavar="SCORES",
                            help="a report's scores.json of MODEL, to colour the heads by")

    def check(self, args):
        from ..core.head_scores import load_scores_file
        from ..surgeon.plan import Plan

        settings = settings_from_args(AtlasSettings, args)
        if args.compare and args.model2:
            raise HeadlabError("compare with a second model or with a plan (--compare), not both")
        check_folder(args.out, args.overwrite, "--out folder")
        from ..probes.figures import check_plotly_source  # plotly.js beside the pages: checked before any work
        check_plotly_source(args.out)
        config = common.model_config(args)
        shape = common.model_shape_of(config)
        heads = shape.n_layers * shape.n_heads * (2 if args.model2 or args.compare else 1)
        if settings.clusters > heads:
            raise HeadlabError(f"--clusters {settings.clusters}: more clusters than the {heads} heads to cluster")
        common.check_window_fits(config, settings.text.tokens, "--tokens")
        if args.model2:
            common.model_config(args, spec=args.model2)
        scores = load_scores_file(args.scores, shape) if args.scores else {}
        common.check_scores_model(scores, set(scores), args.model)
        plan = Plan.load(args.compare) if args.compare else None
        if plan is not None:
            plan.validate(shape)
        return settings, scores, plan

    def need(self, args, checked):
        from ..core.resources import Forward

        settings = checked[0]
        shape = common.model_shape_of(common.model_config(args))
        return common.need(args, [Forward(settings.text.tokens, maps=shape.n_heads, logits="all")], "--tokens")

    def run(self, args, checked) -> int:
        from tqdm.auto import tqdm

        from ..probes.atlas.build import atlas_document, build_atlas, describe_models
        from ..probes.atlas.page import write_atlas

        settings, scores, plan = checked
        specs = [args.model] + ([args.model2] if args.model2 else [])
        sets, labels = describe_models(specs, settings, plan, Path(args.compare).name if plan else None,
                                       load=lambda spec: common.load_model_from(args, spec))
        heads = sum(d.first.numel() for d in sets)
        tqdm.write(f"embedding the {heads} heads in 2D (an autoencoder, PCA and t-SNE) and clustering them",
                   file=sys.stderr)
        atlas = build_atlas(sets, [scores] + [{}] * (len(sets) - 1), settings.clusters, settings.seed, progress=True)
        tqdm.write("writing atlas.json and atlas.html", file=sys.stderr)
        doc = atlas_document(atlas, labels, {**dataclasses.asdict(settings), "compare": args.compare})
        out = write_atlas(args.out, doc, args.overwrite)
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
