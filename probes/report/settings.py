"""The report's settings (:class:`ReportSettings`): the windows it scores on and the score families
it adds (:mod:`..scorers.families`), one definition for the library and the command line. Importing
this module costs no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...core.kinds import Choice, ExistingFile, Integer, Items, Maybe, Number, Registered
from ...core.settings import check_settings, setting
from ...core.text import TextWindows
from ..scorers.families import SCORE_FAMILIES
from ..scorers.settings import POOLS, NeedleSettings, SinkSettings


@dataclass
class ReportSettings:
    """What the report measures on: the windows of ``text`` (its text is also the needle runs'
    haystack unless ``needles`` names another), placed with ``seed``; ``n_views`` attention views.
    The pattern scores (sink, entropy, previous-token, confidence) are always computed, then the
    families named in ``families`` (the registry :data:`~..scorers.families.SCORE_FAMILIES`; those that
    need a causal language model are skipped, with the reason, on other models): e.g. ``retrieval`` runs
    needle-in-a-haystack with ``needles``, ``sinks`` uses the thresholds ``sinks``, ``context`` removes the leading
    ``context_fraction`` of each window. With ``probe_data`` (JSON lines of ``{"text", "label"}``)
    each head's output is probed for the labels (pooled by ``probe_pool``)."""

    text: TextWindows = setting(default_factory=lambda: TextWindows(windows=8, tokens=256))
    seed: int = setting(0, "seed choosing the windows", kind=Integer(0), flag="--seed")
    n_views: int = setting(6, "attention views of top heads", kind=Integer(0), flag="--views")
    top_k: int = setting(10, "heads listed per score", kind=Integer(1))
    families: tuple[str, ...] = setting(
        ("induction", "gradient", "retrieval", "sinks", "context"),
        lambda: "comma list of the score families beyond the pattern scores, or 'none': " + "; ".join(
            f"{family.name}: {family.summary}" + (" (causal language models only)" if family.causal_only else "")
            for family in SCORE_FAMILIES.values() if family.choice),
        kind=Items(Registered(SCORE_FAMILIES, "score families", lambda family: family.choice), none_word="none",
                   min_items=0), flag="--families")
    needles: NeedleSettings = setting(default_factory=NeedleSettings)
    sinks: SinkSettings = setting(default_factory=SinkSettings)
    context_fraction: float = setting(0.5, "leading fraction of a window removed for the context score",
                                      kind=Number(0.0, 1.0, low_open=True, high_open=True))
    probe_data: str | None = setting(None, 'labelled texts, one {"text": ..., "label": ...} per line: adds '
                                           "probe_accuracy, the 5-fold cross-validated logistic-regression accuracy "
                                           "on each head's output", kind=Maybe(ExistingFile()), flag="--probe-data")
    probe_pool: str = setting("last", "head output probed: at the last token or averaged over tokens",
                              kind=Choice(*POOLS), flag="--probe-pool")

    def __post_init__(self):
        check_settings(self)
        self.text.require_tokens(4, "the report")
        if self.text.text_path is not None and self.needles.text_path is None:
            self.needles = dataclasses.replace(self.needles, text_path=self.text.text_path)
        if self.probe_data:
            from ..scorers.labelled import load_labelled

            load_labelled(self.probe_data)  # fail on a bad file before hours of scoring


__all__ = ["ReportSettings"]
