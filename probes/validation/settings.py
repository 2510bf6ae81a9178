"""The masking validation's settings (``headlab validate``): which heads are masked and how, against which random
sets, and the data its metrics run on; one definition for the library and the command line. Importing this
module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.kinds import Choice, Integer, Items, Maybe, Number
from ...core.settings import check_settings, setting
from ...core.text import TextWindows
from ..scorers.settings import N_HELDOUT_NEEDLES, PROMPT_STYLE_HELP, PROMPT_STYLES

METRICS = ("needle-recall", "loss")


MASKING_MODES = ("uniform", "zero", "mean")


@dataclass
class MaskingSettings:
    """How heads are masked and what they are compared with: the top-K heads of a score for every
    K in ``ks``, against ``random_sets`` random sets per K (drawn with the validation's seed) matched by
    layer to the top-K heads, never from the top-K itself nor above ``exclude_above``."""

    ks: tuple[int, ...] = setting((5, 10, 20), "numbers of heads masked", kind=Items(Integer(1)), flag="--ks")
    random_sets: int = setting(20, "random head sets per K (the rank test's smallest p-value is 1/(sets+1))",
                               kind=Integer(1), flag="--random-sets")
    mode: str = setting("uniform", "uniform: the heads' query zeroed, i.e. uniform attention (on the decode steps "
                                   "for needle recall, as the retrieval-head harness; on every token for the loss); "
                                   "zero: their outputs zeroed; mean: their outputs replaced by their mean on "
                                   "held-out text", kind=Choice(*MASKING_MODES), flag="--mode")
    exclude_above: float | None = setting(None, "random heads never score above this (default: the retrieval-head "
                                                "threshold 0.1 for the retrieval score, no limit for others)",
                                          kind=Maybe(Number()), flag="--exclude-above")
    metric: str | None = setting(None, "what masking is measured by (default needle-recall for the retrieval score, "
                                       "loss for the others)", kind=Maybe(Choice(*METRICS)), flag="--metric")
    bootstrap: int = setting(2000, "bootstrap resamples of the prompts for the confidence intervals",
                             kind=Integer(100), flag="--bootstrap")

    def __post_init__(self):
        check_settings(self)


@dataclass
class ValidationSettings:
    """The masking validation of a score (:class:`MaskingSettings`) and the data its metrics run
    on. Needle recall: :data:`~..scorers.needles.HELDOUT_NEEDLES` hidden in a held-out haystack (other
    standard-library docstrings than the scoring runs', or ``text``'s file), every needle at every
    length and depth; only prompts the unmasked model answers count. Loss: the windows of ``text``
    (the held-out docstrings by default). ``seed`` places the windows and draws the random head sets
    and the bootstrap."""

    masking: MaskingSettings = setting(default_factory=MaskingSettings)
    needle_lengths: tuple[int, ...] = setting((512, 1024, 2048), "prompt lengths of the needle-recall metric",
                                              kind=Items(Integer(128)), flag="--needle-lengths")
    needle_depths: tuple[float, ...] = setting((0.1, 0.3, 0.5, 0.7, 0.9), "needle depths (0 = start of the haystack, "
                                               "1 = end)", kind=Items(Number(0.0, 1.0)), flag="--needle-depths")
    n_needles: int = setting(N_HELDOUT_NEEDLES, "held-out needles hidden at each length and depth",
                             kind=Integer(1, N_HELDOUT_NEEDLES), flag="--needles")
    max_new_tokens: int = setting(32, "greedy tokens generated per answer", kind=Integer(1))
    rouge_min: float = setting(0.5, "an answer is recalled when its ROUGE-1 recall exceeds this", kind=Number(0.0, 1.0))
    prompt_style: str = setting("headlab", PROMPT_STYLE_HELP, kind=Choice(*PROMPT_STYLES), flag="--prompt-style")
    text: TextWindows = setting(default_factory=lambda: TextWindows(windows=16, tokens=256))
    seed: int = setting(0, "seed of the text windows, the random head sets and the bootstrap", kind=Integer(0),
                        flag="--seed")

    def __post_init__(self):
        check_settings(self)
        self.text.require_tokens(4, "the loss metric")


__all__ = ["MASKING_MODES", "METRICS", "MaskingSettings", "ValidationSettings"]
