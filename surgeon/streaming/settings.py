"""Settings of streaming heads: which KV heads keep their whole context (``headlab stream-plan``,
:class:`StreamingSettings`) and DuoAttention's gate training (``headlab train-gates``,
:class:`GateSettings`); the streaming defaults live here once, for the :class:`~headlab.surgeon.Stream`
edit too. Importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import HeadlabError
from ...core.kinds import Integer, Maybe, Number, Switch, TextFile
from ...core.settings import check_settings, setting

STREAM_SINKS = 4  # first tokens a streaming head keeps (RazorAttention)
STREAM_WINDOW = 256  # latest positions a streaming head keeps (RazorAttention, DuoAttention)


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


@dataclass
class GateSettings:
    """DuoAttention's gate training: a gate ``α`` per KV head of the global layers, starting at 1,
    mixes full and streaming attention (``sinks`` first tokens, ``window`` latest positions); each
    step is one synthetic passkey sample (``passkeys`` passkeys of ``passkey_words`` words at random
    depths of a haystack, then the request to repeat them) of a length drawn from ``intervals``
    lengths between ``min_length`` and ``max_length``; the loss is the MSE of the final hidden states
    at the positions that predict the answer, against the unedited model's, plus ``lam·mean|α|``."""

    steps: int = setting(2000, "training steps (one sample each)", kind=Integer(1), flag="--steps")
    lr: float = setting(0.02, "Adam learning rate of the gates", kind=Number(0.0, low_open=True), flag="--lr")
    lam: float = setting(0.05, "weight of the mean |α| penalty", kind=Number(0.0), flag="--lam")
    min_length: int = setting(1000, "shortest sample, in tokens", kind=Integer(256), flag="--min-length")
    max_length: int = setting(32000, "longest sample, in tokens (capped at the model's positions)", kind=Integer(256),
                              flag="--max-length")
    intervals: int = setting(50, "sample lengths between the shortest and the longest", kind=Integer(1),
                             flag="--intervals")
    passkeys: int = setting(10, "passkeys per sample", kind=Integer(1), flag="--passkeys")
    passkey_words: int = setting(32, "words per passkey", kind=Integer(1), flag="--passkey-words")
    sinks: int = setting(128, "first valid tokens the streaming attention keeps", kind=Integer(0), flag="--sinks")
    window: int = setting(256, "latest positions the streaming attention keeps", kind=Integer(1), flag="--window")
    save_every: int = setting(10, "steps between saves of the training state (a killed run resumes from it; "
                                  "a larger --steps extends a finished one)", kind=Integer(1), flag="--save-every")
    text_path: str | None = setting(None, "haystack text (default: the standard-library docstrings)",
                                    kind=Maybe(TextFile()), flag="--text-file")
    seed: int = setting(0, "seed of the samples", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)
        if self.min_length > self.max_length:
            raise HeadlabError(f"--min-length {self.min_length} is above --max-length {self.max_length}")


__all__ = ["STREAM_SINKS", "STREAM_WINDOW", "GateSettings", "StreamingSettings"]
