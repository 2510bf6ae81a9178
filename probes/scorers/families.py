"""The score families a report can add to the pattern scores, one registry entry each: its name (the
``--scores`` choice), a one-line summary (the command line's help), whether it needs a causal
language model, when it is requested, and the function that scores the heads (yielding one or
more :class:`~headlab.core.head_scores.HeadScores`, whose descriptions go into ``scores.json`` and the report).

Adding a family is one :func:`score_family` entry; the report, ``--scores`` and its help find it
here. A family that does not apply to the model is reported as skipped with the reason. Importing
this module costs no torch: the scoring functions import what they need when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from ...core.head_scores import HeadScores
    from ..report.settings import ReportSettings


@dataclass
class FamilyInputs:
    """What a family scores on: the model, its tokenizer and id, the report's text windows (each
    ``[1, n_tokens]``), the report's settings and whether to show progress."""

    model: Any
    tokenizer: Any
    model_id: str
    windows: list
    settings: "ReportSettings"
    progress: bool = True

    def counts(self, n: int | None = None):
        """A ``[layer, head]`` tensor of ``n`` (default: the number of windows): how many samples
        each head's score averages."""
        import torch

        from ...core.shape import model_shape

        shape = model_shape(self.model)
        return torch.full((shape.n_layers, shape.n_heads), len(self.windows) if n is None else n)

    @property
    def window_settings(self) -> dict:
        return {"windows": len(self.windows), "n_tokens": self.settings.text.tokens}


@dataclass(frozen=True)
class ScoreFamily:
    """One family: ``run(inputs)`` yields its scores; ``requested(settings)`` says whether a report
    asked for it (default: its name is in ``--scores``); ``choice``: offered by ``--scores``;
    ``page``: the documentation page the report links its scores to; ``softmax_only``: it edits,
    gates or reads head outputs or statistics of every layer, which layers converted to linear
    attention do not allow (their attention maps are all they give); ``check(inputs)``, where given,
    raises :class:`~headlab.core.errors.HeadlabError` for inputs the family cannot use, before any
    family scores."""

    name: str
    summary: str
    run: Callable[[FamilyInputs], Iterator["HeadScores"]]
    causal_only: bool = False
    choice: bool = True
    requested: Callable[["ReportSettings"], bool] | None = field(default=None, compare=False)
    page: str | None = None  # its method page in the documentation, e.g. "methods/sinks"
    softmax_only: bool = False
    check: Callable[[FamilyInputs], None] | None = field(default=None, compare=False)

    def is_requested(self, settings: "ReportSettings") -> bool:
        return self.requested(settings) if self.requested is not None else self.name in settings.families


SCORE_FAMILIES: dict[str, ScoreFamily] = {}


def score_family(name: str, summary: str, causal_only: bool = False, choice: bool = True,
                 requested: Callable[["ReportSettings"], bool] | None = None, page: str | None = None,
                 softmax_only: bool = False, check: Callable[[FamilyInputs], None] | None = None):
    """Decorator registering a scoring function ``run(inputs) -> Iterator[HeadScores]`` as a family."""
    def register(run):
        if name in SCORE_FAMILIES:
            raise ValueError(f"score family {name!r} is registered already")
        SCORE_FAMILIES[name] = ScoreFamily(name, summary, run, causal_only, choice, requested, page, softmax_only,
                                           check)
        return run
    return register


def requested_families(settings: "ReportSettings", causal: bool,
                       converted: bool = False) -> tuple[list[ScoreFamily], dict[str, str]]:
    """``(families to run, {family: reason} of those requested that do not apply)``, in registry order;
    ``converted``: the model has layers converted to linear attention."""
    run, skipped = [], {}
    for family in SCORE_FAMILIES.values():
        if not family.is_requested(settings):
            continue
        if family.causal_only and not causal:
            skipped[family.name] = "needs a causal language model"
        elif family.softmax_only and converted:
            skipped[family.name] = "needs softmax attention in every layer (this model has converted layers)"
        else:
            run.append(family)
    return run, skipped


def _scores(name, values, counts, inputs: FamilyInputs, description: str, settings: dict):
    from ...core.head_scores import HeadScores

    return HeadScores(name, values, counts, inputs.model_id, description, settings)


@score_family("sinks", "massive activations and each head's mass on hidden-state sink tokens",
              page="methods/sinks")
def _sinks(inputs: FamilyInputs):
    from .sinks import massive_activations

    tau = inputs.settings.sinks.tau
    massive = massive_activations(inputs.model, inputs.windows, inputs.settings.sinks, inputs.progress)
    yield _scores("sink_massive", massive.scores, inputs.counts(), inputs,
                  f"mean row mass on hidden-state sink tokens (max over sink dimensions {massive.sink_dims} of "
                  f"|x_d| / RMS(x) > {tau} at the layer's input; NaN where no row sees one; Kang et al., VAR)",
                  {**inputs.window_settings, **massive.summary()})


@score_family("context", "VHD: how far each head's output moves when the leading part of a window is removed",
              page="methods/vhr", softmax_only=True)
def _context(inputs: FamilyInputs):
    from .divergence import context_divergence

    fraction = inputs.settings.context_fraction
    result = context_divergence(inputs.model, inputs.windows, fraction, inputs.progress)
    yield _scores("context_divergence", result.raw, inputs.counts(), inputs,
                  f"VHD: ||z(window) - z(window without its leading {fraction:.0%} after the first token)|| of each "
                  "head's output at the last token, mean over windows (VHR's head divergence)",
                  {**inputs.window_settings, "span_fraction": fraction, "outlier_zeroed": result.zeroed.tolist(),
                   "selected": result.selected.int().tolist()})


@score_family("probe", "cross-validated logistic-regression accuracy on each head's output (with --probe-data)",
              choice=False, requested=lambda settings: settings.probe_data is not None, page="methods/probing",
              softmax_only=True)
def _probe(inputs: FamilyInputs):
    import torch

    from .labelled import load_labelled
    from .probing import probe_heads

    s = inputs.settings
    probe = probe_heads(inputs.model, inputs.tokenizer, load_labelled(s.probe_data), s.probe_pool, seed=s.seed,
                        progress=inputs.progress)
    yield _scores("probe_accuracy", probe.accuracy, torch.full_like(inputs.counts(), probe.n_examples), inputs,
                  f"cross-validated accuracy of a logistic regression on the head's output ({s.probe_pool} token) "
                  f"predicting the labels of {s.probe_data}; majority-label baseline {probe.majority:.3f}",
                  {**probe.settings, "data": s.probe_data, "majority": probe.majority,
                   "labels": [str(label) for label in probe.labels]})


@score_family("induction", "induction and duplicate-token attention on repeated random tokens", causal_only=True,
              page="methods/patterns")
def _induction(inputs: FamilyInputs):
    from . import importance

    repeat = {"n_batch": 10, "half": 50, "seed": inputs.settings.seed}
    for name, values in importance.repeated_token_scores(inputs.model, **repeat, progress=inputs.progress).items():
        yield _scores(name, values, inputs.counts(10), inputs, importance.REPEAT_DESCRIPTIONS[name], repeat)


def _check_vocabulary(inputs: FamilyInputs) -> None:
    from .razor import check_vocabulary

    check_vocabulary(inputs.model.config)


@score_family("razor", "RazorAttention's echo and induction scores on 4 x 2500 repeated random ids (one 10,001-token "
              "forward, statistics only)", causal_only=True, page="methods/streaming", softmax_only=True,
              check=_check_vocabulary)
def _razor(inputs: FamilyInputs):
    from .razor import DESCRIPTIONS, PERIOD, REPEATS, razor_scores

    repeat = {"period": PERIOD, "repeats": REPEATS, "seed": inputs.settings.seed}
    for name, values in razor_scores(inputs.model, **repeat, progress=inputs.progress).items():
        yield _scores(name, values, inputs.counts(1), inputs, DESCRIPTIONS[name].format(**repeat), repeat)


@score_family("gradient", "Michel et al.'s gradient importance of each head's gate", causal_only=True,
              page="methods/importance", softmax_only=True)
def _gradient(inputs: FamilyInputs):
    from . import importance

    values = importance.gradient_importance(inputs.model, inputs.windows, inputs.progress)
    yield _scores("gradient_importance", values, inputs.counts(), inputs,
                  "Michel et al.: mean |dLoss/d gate| per head, layer-L2-normalised, min-max to [0, 1]",
                  inputs.window_settings)


def _ablation(mode: str):
    def run(inputs: FamilyInputs):
        from . import importance

        values = importance.ablation_importance(inputs.model, inputs.windows, mode, inputs.progress)
        yield _scores(f"ablation_{mode}", values, inputs.counts(), inputs,
                      f"loss increase when the head is {mode}-ablated", {**inputs.window_settings, "mode": mode})
    return run


score_family("ablation-zero", "loss increase with the head's output zeroed (one pass per head and window)",
             causal_only=True, page="methods/importance", softmax_only=True)(_ablation("zero"))
score_family("ablation-mean", "loss increase with the head's output at its mean (one pass per head and window)",
             causal_only=True, page="methods/importance", softmax_only=True)(_ablation("mean"))


def _check_needles(inputs: FamilyInputs) -> None:
    from .retrieval import needle_prompts

    needle_prompts(inputs.tokenizer, inputs.settings.needles)  # raises for a haystack too short for the lengths


@score_family("retrieval", "Wu et al.'s copy-paste score on needle-in-a-haystack runs", causal_only=True,
              page="methods/retrieval", softmax_only=True, check=_check_needles)
def _retrieval(inputs: FamilyInputs):
    import torch

    from .retrieval import retrieval_scores

    needles = inputs.settings.needles
    result = retrieval_scores(inputs.model, inputs.tokenizer, needles, progress=inputs.progress)
    recalled = sum(r["recalled"] for r in result.runs)
    yield _scores("retrieval", result.scores, torch.full_like(inputs.counts(), recalled), inputs,
                  f"Wu et al. copy-paste score on needle-in-a-haystack, mean over the {recalled} of "
                  f"{len(result.runs)} runs whose answer was recalled (ROUGE-1 recall > {needles.rouge_min}); "
                  f"retrieval heads > {needles.retrieval_threshold}",
                  {**needles.to_dict(), "recalled": recalled, "runs": result.runs})


__all__ = ["FamilyInputs", "SCORE_FAMILIES", "ScoreFamily", "requested_families", "score_family"]
