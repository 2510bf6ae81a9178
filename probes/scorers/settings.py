"""Settings of the scorers the report and the other products share: the needle-in-a-haystack runs
(:class:`NeedleSettings`) and sink detection (:class:`SinkSettings`), one definition for the library and
the command line (:mod:`headlab.core.settings`). Importing this module costs no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...core.kinds import Choice, Integer, Items, Maybe, Number, TextFile
from ...core.settings import check_settings, setting

N_NEEDLES = 3  # needles of .needles: scoring ...
N_HELDOUT_NEEDLES = 6  # ... and validation
POOLS = ("last", "mean")
PROMPT_STYLES = ("headlab", "harness")  # wordings of .retrieval.PROMPT_WORDINGS
PROMPT_STYLE_HELP = ("question wording: headlab's ('Based on the content of the text above, answer the question.') "
                     "or the retrieval-head harness's ('<book>...</book> Based on the content of the book, ...')")


@dataclass
class NeedleSettings:
    """The NIAH grid: every needle at every ``(length, depth)``; ``length`` counts prompt tokens
    (haystack + needle + question, chat template included). Defaults are a CPU-sized subset of
    the published grid (20 lengths × 10 depths up to 50k tokens)."""

    lengths: tuple[int, ...] = setting((1024, 4096), "prompt lengths of the needle-in-a-haystack runs, in tokens",
                                       kind=Items(Integer(128)), flag="--needle-lengths")
    depths: tuple[float, ...] = setting((0.25, 0.75), "needle depths (0 = start of the haystack, 1 = end)",
                                        kind=Items(Number(0.0, 1.0)), flag="--needle-depths")
    n_needles: int = setting(N_NEEDLES, "needles hidden at each length and depth", kind=Integer(1, N_NEEDLES),
                             flag="--needles")
    max_new_tokens: int = setting(24, "greedy tokens generated per run", kind=Integer(1))
    mode: str = setting("count", "copy-score rule: 'count' (reference files) or 'set' (the paper's |g ∩ k| / |k|)",
                        kind=Choice("count", "set"))
    rouge_min: float = setting(0.5, "a run counts when the answer's ROUGE-1 recall exceeds this",
                               kind=Number(0.0, 1.0))
    prompt_style: str = setting("headlab", PROMPT_STYLE_HELP, kind=Choice(*PROMPT_STYLES), flag="--prompt-style")
    text_path: str | None = setting(None, "haystack text (default: standard-library docstrings)",
                                    kind=Maybe(TextFile()))
    retrieval_threshold: float = setting(0.1, "score above which a head counts as a retrieval head",
                                         kind=Number(0.0))

    def __post_init__(self):
        check_settings(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SinkSettings:
    """Thresholds of sink-dimension detection (``abs_min``, ``ratio_min``, ``min_fraction``,
    ``max_dims``) and of sink tokens (``tau``: ``φ > 20``).

    ``ratio_min`` defaults to 100, not the published 1000 (from LLaVA-scale models): SmolLM2-135M's
    largest first-token ratio ``|x_d| / median|x|`` is about 500 (dimension 507, layers 12-28), so
    the published value finds no sink dimension there."""

    abs_min: float = setting(100.0, "a sink dimension's first-token |x_d| is above this", kind=Number(0.0))
    ratio_min: float = setting(100.0, "sink dimension: |x_d| at the first token >= this x its median |x| and > 100 "
                                      "(the published 1000 finds none in SmolLM2-135M)",
                               kind=Number(1.0), flag="--sink-ratio")
    min_fraction: float = setting(0.5, "fraction of layers where a dimension must qualify", kind=Number(0.0, 1.0))
    max_dims: int = setting(4, "most sink dimensions kept", kind=Integer(1))
    tau: float = setting(20.0, "a token is a sink token when max_d |x_d| / RMS(x) exceeds this", kind=Number(0.0))

    def __post_init__(self):
        check_settings(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ = ["N_HELDOUT_NEEDLES", "N_NEEDLES", "POOLS", "PROMPT_STYLES", "PROMPT_STYLE_HELP", "NeedleSettings",
           "SinkSettings"]
