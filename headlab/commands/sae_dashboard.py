"""``headlab sae dashboard``: a standalone page of chosen latents."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import HeadlabError
from ..core.files import claim_file
from ..core.kinds import Integer, Items, Maybe
from ..core.settings import check_settings, setting, settings_from_args
from ..core.text import TextWindows
from . import common
from .base import Command, register_command
from .sae_eval import sae_folder_argument, saved_autoencoder


@dataclass
class DashboardData:
    """Which latents ``sae dashboard`` shows and on which windows of text it looks for their examples."""

    latents: tuple[int, ...] | None = setting(None, "comma list of latents (default: the --top most frequent)",
                                              kind=Maybe(Items(Integer(0))), flag="--latents")
    top: int = setting(8, "most frequently active latents shown when --latents is not given", kind=Integer(1),
                       flag="--top")
    text: TextWindows = setting(default_factory=lambda: TextWindows(windows=32, tokens=128))
    seed: int = setting(1, "window seed", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


@register_command
class SaeDashboard(Command):
    name = "sae dashboard"
    help = "standalone HTML page of chosen latents"
    description = ("Write one standalone HTML page of the autoencoder in SAE_DIR: for each chosen latent (--latents, "
                   "or the --top most frequently active) its top-activating contexts over --windows windows of text, "
                   "its firing histogram and the heads its decoder reads. Cost: a few forwards per window (seconds "
                   "for SmolLM2-135M on two CPU cores).")
    example = "{sae} --top 2 --windows 2 --tokens 64 --out {out}/features.html"
    model = "option"
    output = "HTML page to write"
    settings = (DashboardData,)

    def arguments(self, parser) -> None:
        sae_folder_argument(parser)

    def check(self, args):
        data = settings_from_args(DashboardData, args)
        claim_file(args.out, args.overwrite, "--out page")
        sae, _, spec = saved_autoencoder(args)
        for latent in data.latents or ():
            if latent >= sae.d_sae:
                raise HeadlabError(f"--latents: {latent} is not a latent of this autoencoder (0..{sae.d_sae - 1})")
        if data.latents is None and data.top > sae.d_sae:
            raise HeadlabError(f"--top {data.top} is more than the autoencoder's {sae.d_sae} latents")
        return data, spec

    def need(self, args, checked):
        from ..core.resources import Forward

        data, spec = checked
        return common.need(args, [Forward(data.text.tokens)], "--tokens", spec=spec)

    def run(self, args, checked) -> int:
        from ..sae.pipeline import feature_dashboards

        data, spec = checked
        model, tokenizer = common.load_model_from(args, spec)
        latents = list(data.latents) if data.latents else None
        print(feature_dashboards(args.sae, model, tokenizer, args.out, latents, data.top, data.text, data.seed,
                                 args.overwrite))
        return 0
