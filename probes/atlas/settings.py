"""The head atlas's settings (``headlab atlas``); one definition for the library and the command line.
Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.kinds import Integer
from ...core.settings import check_settings, setting
from ...core.text import TextWindows


@dataclass
class AtlasSettings:
    """The head atlas: every head's descriptor averaged over the windows of ``text``, embedded and cut
    into ``clusters`` clusters; ``seed`` places the windows and seeds the autoencoder, t-SNE and
    k-means."""

    text: TextWindows = setting(default_factory=lambda: TextWindows(windows=8, tokens=256))
    clusters: int = setting(6, "k-means clusters of the heads", kind=Integer(1), flag="--clusters")
    seed: int = setting(0, "seed of the windows, the autoencoder, t-SNE and k-means", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)
        self.text.require_tokens(16, "the atlas's pooled maps")


__all__ = ["AtlasSettings"]
