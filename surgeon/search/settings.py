"""Settings of ACT's head search (``headlab calibrate``); its defaults live here once, for the
:class:`~headlab.surgeon.Calibrate` edit too. Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.kinds import Indices, Maybe, Number
from ...core.settings import check_settings, setting

ACT_BETA = 0.4  # sink weights are multiplied by this
ACT_THRESHOLD = 0.1  # keys whose mean received attention exceeds this are sinks


@dataclass
class CalibrationSettings:
    """Which heads the search tries (every head of ``layers``) and with which ACT parameters;
    a head is kept when calibrating it alone raises accuracy by more than ``margin``."""

    layers: tuple | None = setting(None, "layers whose heads are tried, e.g. 2-28 or 3,5,-2 (default: 2 to the "
                                         "second-to-last)", kind=Maybe(Indices()), flag="--layers")
    beta: float = setting(ACT_BETA, "ACT's beta: sink weights are multiplied by it", kind=Number(0.0, 1.0),
                          flag="--beta")
    threshold: float = setting(ACT_THRESHOLD, "a key is a sink when its mean received attention exceeds this",
                               kind=Number(0.0, 1.0), flag="--threshold")
    margin: float = setting(0.0, "keep a head when its accuracy beats the unedited model's by more than this",
                            kind=Number(-1.0, 1.0), flag="--margin")

    def __post_init__(self):
        check_settings(self)


__all__ = ["ACT_BETA", "ACT_THRESHOLD", "CalibrationSettings"]
