"""The settings of the KV-cache compression evaluation (``headlab stream-eval``); one definition for the library
and the command line. Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.kinds import Choice, Integer, Items, Maybe, Number, Switch, Text, TextFile
from ...core.settings import check_settings, setting
from ...surgeon.streaming.settings import STREAM_SINKS, STREAM_WINDOW
from ...core.errors import HeadlabError
from ..scorers.settings import N_HELDOUT_NEEDLES, N_NEEDLES, PROMPT_STYLE_HELP, PROMPT_STYLES

PROGRESS_FILE = "compression.progress.json"  # stream-eval's finished runs, beside compression.json


@dataclass
class CompressionSettings:
    """The evaluation of streaming-head plans (KV-cache compression): for every selection rule and
    kept fraction of KV heads, needle recall on held-out prompts (:data:`~..scorers.needles.HELDOUT_NEEDLES`
    in the held-out haystack, every needle at every length and depth), perplexity on held-out windows
    of each length, and the KV-cache bytes after the prompt; the random rule is drawn ``random_sets``
    times (seeds ``seed``, ``seed + 1``, ...)."""

    rules: tuple[str, ...] = setting(("retrieval", "razor", "random"),
                                     "selection rules: score names of --scores, razor (echo and razor_induction) or "
                                     "random ('none': presses only)", kind=Items(Text(), none_word="none", min_items=0),
                                     flag="--rules")
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
    tasks: tuple[str, ...] = setting((), "long tasks measured beside the needles, scored by exact match (none by "
                                         "default): niah_single, niah_multikey, niah_multivalue, variable_tracking, "
                                         "common_words", kind=Items(Text(), none_word="none", min_items=0),
                                     flag="--tasks")
    task_prompts: int = setting(30, "prompts of each long task per length", kind=Integer(1), flag="--task-prompts")
    sinks: int = setting(STREAM_SINKS, "first valid tokens a streaming head keeps", kind=Integer(0), flag="--sinks")
    window: int = setting(STREAM_WINDOW, "latest positions a streaming head keeps, itself included", kind=Integer(1),
                          flag="--window")
    compensate: bool = setting(False, "streaming heads also keep RazorAttention's compensation token", kind=Switch(),
                               flag="--compensate")
    scorers: tuple[str, ...] = setting((), "token scorers measured as presses at every --budgets (none by default): "
                                           "streaming_llm, snapkv, tova, knorm, expected_attention, random",
                                       kind=Items(Text(), none_word="none", min_items=0),
                                       flag="--scorers")
    budgets: tuple[float, ...] = setting((0.25, 0.35, 0.5), "presses: fractions of the uncompressed cache's bytes "
                                                            "kept at the prompt's length",
                                         kind=Items(Number(0.0, 1.0, low_open=True)), flag="--budgets")
    allocations: tuple[str, ...] = setting(("uniform",), "presses: how each budget is split between the KV heads: "
                                                         "uniform, pool (Ada-KV: one top-k over a layer's heads) or "
                                                         "scores:RULE (HeadKV: in proportion to a head score of "
                                                         "--scores, razor or random)", kind=Items(Text()),
                                           flag="--allocations")
    hybrids: tuple[str, ...] = setting((), "presses with whole heads, RULE:WHOLE:WINDOW[:SCORER] each (e.g. "
                                           "razor:0.1:64): the WHOLE fraction of KV heads RULE ranks highest keep "
                                           "every position, the others their sinks, a WINDOW of latest positions and "
                                           "the choice of each scorer (of SCORER only, when named)",
                                       kind=Items(Text(), none_word="none", min_items=0), flag="--hybrids")
    modes: tuple[str, ...] = setting(("agnostic",), "presses: agnostic (the context compressed before the question "
                                                    "is seen) and/or aware (after)",
                                     kind=Items(Choice("agnostic", "aware")), flag="--modes")
    press_window: int = setting(32, "presses: latest positions every compressed head keeps", kind=Integer(0),
                                flag="--press-window")
    max_new_tokens: int = setting(32, "greedy tokens generated per answer", kind=Integer(1))
    rouge_min: float = setting(0.5, "an answer is recalled when its ROUGE-1 recall exceeds this", kind=Number(0.0, 1.0))
    prompt_style: str = setting("headlab", PROMPT_STYLE_HELP, kind=Choice(*PROMPT_STYLES), flag="--prompt-style")
    text_path: str | None = setting(None, "haystack and perplexity text (default: held-out standard-library "
                                          "docstrings)", kind=Maybe(TextFile()), flag="--text-file")
    seed: int = setting(0, "seed of the first random selection and of the text windows", kind=Integer(0), flag="--seed")
    split: str = setting("heldout", "which prompts and text: heldout (the held-out needles and haystack, for results) "
                                    "or selection (the needles and haystack the head scores were made on, for choosing "
                                    "a press's settings before measuring the chosen one on held-out prompts)",
                         kind=Choice("heldout", "selection"), flag="--split")

    def __post_init__(self):
        check_settings(self)
        if self.split == "selection" and self.n_needles > N_NEEDLES:
            raise HeadlabError(f"--split selection has {N_NEEDLES} needles, not --needles {self.n_needles}")


__all__ = ["PROGRESS_FILE", "CompressionSettings"]
