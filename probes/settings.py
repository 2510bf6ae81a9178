"""Settings of the probes' commands (needle-in-a-haystack runs, sink detection, the masking
validation, the attention view; the report's own are in :mod:`.report_settings`), one definition for the library and the command line
(:mod:`headlab.core.settings`). Importing this module costs no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.kinds import Choice, Indices, Integer, Items, Kind, Maybe, Number, Switch, Text, TextFile
from ..core.settings import check_settings, setting
from ..surgeon.streaming.settings import STREAM_SINKS, STREAM_WINDOW

N_NEEDLES = 3  # needles of .needles: scoring ...
N_HELDOUT_NEEDLES = 6  # ... and validation
POOLS = ("last", "mean")
METRICS = ("needle-recall", "loss")
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


MASKING_MODES = ("uniform", "zero", "mean")


@dataclass
class MaskingSettings:
    """How heads are masked and what they are compared with: the top-K heads of a score for every
    K in ``ks``, against ``random_sets`` random sets per K drawn (with ``seed``) matched by layer to
    the top-K heads, never from the top-K itself nor above ``exclude_above``."""

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
    seed: int = setting(0, "seed of the random head sets and the bootstrap", kind=Integer(0), flag="--random-seed")
    bootstrap: int = setting(2000, "bootstrap resamples of the prompts for the confidence intervals",
                             kind=Integer(100), flag="--bootstrap")

    def __post_init__(self):
        check_settings(self)


@dataclass
class ValidationSettings:
    """The masking validation of a score (:class:`MaskingSettings`) and the data its metrics run
    on. Needle recall: :data:`~.needles.HELDOUT_NEEDLES` hidden in a held-out haystack (other
    standard-library docstrings than the scoring runs'), every needle at every length and depth;
    only prompts the unmasked model answers count. Loss: ``samples`` windows of ``tokens`` tokens of
    the held-out text chosen with ``seed``."""

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
    text_path: str | None = setting(None, "haystack and loss text (default: held-out standard-library docstrings)",
                                    kind=Maybe(TextFile()), flag="--text-file")
    samples: int = setting(16, "text windows for the loss metric", kind=Integer(1), flag="--samples")
    tokens: int = setting(256, "tokens per window for the loss metric", kind=Integer(4), flag="--tokens")
    seed: int = setting(0, "seed of the text windows", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


PROGRESS_FILE = "compression.progress.json"  # stream-eval's finished runs, beside compression.json


@dataclass
class CompressionSettings:
    """The evaluation of streaming-head plans (KV-cache compression): for every selection rule and
    kept fraction of KV heads, needle recall on held-out prompts (:data:`~.needles.HELDOUT_NEEDLES`
    in the held-out haystack, every needle at every length and depth), perplexity on held-out windows
    of each length, and the KV-cache bytes after the prompt; the random rule is drawn ``random_sets``
    times (seeds ``seed``, ``seed + 1``, ...)."""

    rules: tuple[str, ...] = setting(("retrieval", "razor", "random"),
                                     "selection rules: score names of --scores, razor (echo and razor_induction) or "
                                     "random", kind=Items(Text()), flag="--rules")
    keeps: tuple[float, ...] = setting((0.1, 0.25, 0.5), "fractions of KV heads that keep the whole context",
                                       kind=Items(Number(0.0, 1.0)), flag="--keeps")
    random_sets: int = setting(3, "random selections drawn per kept fraction", kind=Integer(1), flag="--random-sets")
    lengths: tuple[int, ...] = setting((1024, 2048, 4096), "prompt and window lengths, in tokens",
                                       kind=Items(Integer(128)), flag="--lengths")
    depths: tuple[float, ...] = setting((0.1, 0.3, 0.5, 0.7, 0.9), "needle depths (0 = start of the haystack, 1 = end)",
                                        kind=Items(Number(0.0, 1.0)), flag="--needle-depths")
    n_needles: int = setting(4, "held-out needles hidden at each length and depth", kind=Integer(1, N_HELDOUT_NEEDLES),
                             flag="--needles")
    windows: int = setting(4, "held-out text windows per length for the perplexity", kind=Integer(1), flag="--windows")
    sinks: int = setting(STREAM_SINKS, "first valid tokens a streaming head keeps", kind=Integer(0), flag="--sinks")
    window: int = setting(STREAM_WINDOW, "latest positions a streaming head keeps, itself included", kind=Integer(1),
                          flag="--window")
    compensate: bool = setting(False, "streaming heads also keep RazorAttention's compensation token", kind=Switch(),
                               flag="--compensate")
    max_new_tokens: int = setting(32, "greedy tokens generated per answer", kind=Integer(1))
    rouge_min: float = setting(0.5, "an answer is recalled when its ROUGE-1 recall exceeds this", kind=Number(0.0, 1.0))
    prompt_style: str = setting("headlab", PROMPT_STYLE_HELP, kind=Choice(*PROMPT_STYLES), flag="--prompt-style")
    text_path: str | None = setting(None, "haystack and perplexity text (default: held-out standard-library "
                                          "docstrings)", kind=Maybe(TextFile()), flag="--text-file")
    seed: int = setting(0, "seed of the first random selection and of the text windows", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


@dataclass
class AtlasSettings:
    """The head atlas: every head's descriptor averaged over ``samples`` windows of ``tokens`` tokens
    of the text (seeded), embedded and cut into ``clusters`` clusters."""

    samples: int = setting(8, "text windows the descriptors average over", kind=Integer(1), flag="--samples")
    tokens: int = setting(256, "tokens per window", kind=Integer(16), flag="--tokens")
    clusters: int = setting(6, "k-means clusters of the heads", kind=Integer(1), flag="--clusters")
    text_path: str | None = setting(None, "text to read (default: the standard-library docstrings)",
                                    kind=Maybe(TextFile()), flag="--text-file")
    seed: int = setting(0, "seed of the windows, the autoencoder, t-SNE and k-means", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


class HeadRef(Kind):
    """``LAYER.HEAD`` such as ``17.3`` (a negative layer counts from the end)."""

    metavar = "L.H"

    def parse(self, text: str):
        layer, dot, head = text.strip().partition(".")
        try:
            return self.check((int(layer), int(head)) if dot else None)
        except ValueError:
            raise ValueError(f"{text!r} is not LAYER.HEAD such as 17.3") from None

    def check(self, value):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{value!r} is not a (layer, head) pair")
        return Integer().check(value[0]), Integer(0).check(value[1])


@dataclass
class ViewSettings:
    """What the attention view records and how large its page may grow."""

    layers: tuple | None = setting(None, "layers to record, e.g. 10-14, 3,7 or -2--1 (default all)",
                                   kind=Maybe(Indices()), flag="--layers")
    head: tuple[int, int] | None = setting(None, "head to open first, e.g. 17.3 (default: the top previous-token "
                                                 "head)", kind=Maybe(HeadRef()), flag="--head")
    max_tokens: int = setting(8192, "refuse longer texts", kind=Integer(2), flag="--max-tokens")
    max_payload_mb: float = setting(20.0, "cap on the page's encoded maps in MB; pooling coarsens to fit",
                                    kind=Number(0.01), flag="--max-payload-mb")
    plotlyjs: str = setting("inline", "inline plotly.js so the page opens offline (+4.7 MB) or link the CDN",
                            kind=Choice("inline", "cdn"), flag="--plotlyjs")

    def __post_init__(self):
        check_settings(self)


__all__ = ["MASKING_MODES", "METRICS", "PROGRESS_FILE", "MaskingSettings", "NeedleSettings", "POOLS",
           "SinkSettings", "ValidationSettings", "ViewSettings"]
