"""Settings of the head searches: ACT's (``headlab calibrate``) and the choice of streaming heads
(``headlab stream-plan``); their defaults live here once, for the :class:`~headlab.surgeon.Calibrate` and
:class:`~headlab.surgeon.Stream` edits too. Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.kinds import Indices, Integer, Maybe, Number, Switch
from ...core.settings import check_settings, setting

ACT_BETA = 0.4  # sink weights are multiplied by this
ACT_THRESHOLD = 0.1  # keys whose mean received attention exceeds this are sinks
STREAM_SINKS = 4  # first tokens a streaming head keeps (RazorAttention)
STREAM_WINDOW = 256  # latest positions a streaming head keeps (RazorAttention, DuoAttention)


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


@dataclass
class StreamingSettings:
    """Which KV heads keep their whole context: the ``keep`` fraction of the global-attention layers' KV
    heads a selection rule ranks highest (``seed``: of the random rule); every other KV head of those
    layers streams with ``sinks`` first tokens and a ``window`` of latest positions, and with
    ``compensate`` a compensation token."""

    keep: float = setting(0.25, "fraction of KV heads (of the global-attention layers) that keep the whole context",
                          kind=Number(0.0, 1.0), flag="--keep")
    sinks: int = setting(STREAM_SINKS, "first valid tokens a streaming head keeps", kind=Integer(0), flag="--sinks")
    window: int = setting(STREAM_WINDOW, "latest positions a streaming head keeps, itself included", kind=Integer(1),
                          flag="--window")
    compensate: bool = setting(False, "streaming heads also keep RazorAttention's compensation token (the mean key "
                                      "and value of the positions they drop)", kind=Switch(), flag="--compensate")
    seed: int = setting(0, "seed of the random rule (the control)", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)


__all__ = ["ACT_BETA", "ACT_THRESHOLD", "STREAM_SINKS", "STREAM_WINDOW", "CalibrationSettings", "StreamingSettings"]
