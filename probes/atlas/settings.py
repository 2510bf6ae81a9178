"""The head atlas's settings (``headlab atlas``); one definition for the library and the command line. Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.kinds import Integer, Maybe, TextFile
from ...core.settings import check_settings, setting


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


__all__ = ["AtlasSettings"]
