"""Settings of a linear-attention conversion: how layers are converted (:class:`LinearSettings`,
saved beside the weights), how each training stage runs (:class:`StageSettings`) and what
``headlab convert`` asks for (:class:`ConversionSettings`). Importing this module costs no torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...core.errors import HeadlabError
from ...core.kinds import Choice, Indices, Integer, Items, Kind, Maybe, Number, Switch, Text
from ...core.settings import check_settings, setting
from ...core.text import TextWindows

FORMS = ("hybrid", "linear")
FEATURE_MAPS = ("lolcats", "fla")
FEATURE_INITS = ("identity", "kaiming")
DATA_KINDS = ("text", "chat")
LOSSES = ("mse", "ce")
SOFTMAX_UNITS = ("heads", "layers")  # what a softmax-head rule chooses
LORA_LR = 1e-4  # stage 2's learning rate (LoLCATs' low-rank adjusting)


class KVHeadPairs(Kind):
    """``(layer, KV head)`` pairs of non-negative integers, sorted, none repeated."""

    def check(self, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list of (layer, KV head) pairs")
        pairs = []
        for pair in value:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"{pair!r} is not a (layer, KV head) pair")
            pairs.append(tuple(Integer(0).check(index) for index in pair))
        if len(set(pairs)) != len(pairs):
            raise ValueError("a (layer, KV head) pair is repeated")
        return tuple(sorted(pairs))


@dataclass(frozen=True)
class LinearSettings:
    """How attention layers are converted (saved beside the weights as ``headlab_conversion.json``).

    ``layers`` lists the converted layer indices (``None``: every full-attention layer); the others
    stay softmax. ``softmax_heads`` lists ``(layer, KV head)`` pairs of converted layers that keep
    full softmax attention over the whole context (with their query heads) inside the converted
    layer: a head-level hybrid.
    ``feature_dim`` is ``F`` (64 by default whatever the head size, as LoLCATs does; the features
    number ``2F``). ``gamma_init`` is the initial softmax-window weight ``γ = sigmoid(θ)``.
    """

    form: str = setting("hybrid", "converted form", kind=Choice(*FORMS))
    window: int = setting(64, "softmax window of the hybrid", kind=Integer(1), flag="--window")
    terrace: bool = setting(True, "terrace window (own block plus the previous one) rather than a sliding one",
                            kind=Switch())
    feature_dim: int = setting(64, "F of the feature map (2F features)", kind=Integer(1), flag="--feature-dim")
    feature_map: str = setting("lolcats", "feature map", kind=Choice(*FEATURE_MAPS), flag="--feature-map")
    feature_init: str = setting("identity", "feature-map weights start as the truncated identity (headlab) or "
                                            "kaiming-uniform (the released LoLCATs configs)",
                                kind=Choice(*FEATURE_INITS), flag="--feature-init")
    feature_bias: bool = setting(False, "feature maps with a bias", kind=Switch())
    gamma_init: float = setting(0.1, "initial softmax-window weight", kind=Number(0.0, 1.0, True, True))
    layers: tuple[int, ...] | None = setting(None, "converted layers (None: every full-attention layer)",
                                             kind=Maybe(Items(Integer(0))))
    softmax_heads: tuple[tuple[int, int], ...] = setting((), "(layer, KV head) pairs of converted layers that keep "
                                                             "full softmax attention", kind=KVHeadPairs())

    def __post_init__(self):
        check_settings(self)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))
            outside = sorted({layer for layer, _ in self.softmax_heads} - set(self.layers))
            if outside:
                raise HeadlabError(f"softmax heads name layer(s) {outside}, which are not converted")

    def softmax_kv_heads(self, layer: int) -> tuple[int, ...]:
        """The KV heads of ``layer`` that keep softmax attention."""
        return tuple(kv for index, kv in self.softmax_heads if index == layer)

    @property
    def is_hybrid(self) -> bool:
        return self.form == "hybrid"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        data["softmax_heads"] = [list(pair) for pair in self.softmax_heads]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LinearSettings":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("layers") is not None:
            known["layers"] = tuple(known["layers"])
        return cls(**known)



@dataclass
class StageSettings:
    """One training stage. Defaults are stage 1's (LoLCATs' attention transfer); :func:`lora_defaults` gives stage 2's.
    ``loss`` is ``"mse"`` or ``"ce"`` (stage 1 only)."""

    steps: int = setting(100, "optimiser steps (0 skips the stage)", kind=Integer(0))
    lr: float = setting(1e-2, "learning rate", kind=Number(0.0, low_open=True))
    accumulation: int = setting(8, "sequences per optimiser step", kind=Integer(1))
    clip: float = setting(1.0, "gradient-norm clip", kind=Number(0.0, low_open=True))
    eval_every: int = setting(25, "steps between validations and checkpoints", kind=Integer(1))
    patience: int = setting(10, "validations without improvement before the learning rate drops", kind=Integer(0))
    factor: float = setting(0.1, "learning-rate drop factor", kind=Number(0.0, 1.0, True, True))
    min_lr: float = setting(1e-5, "smallest learning rate", kind=Number(0.0))
    loss: str = setting("mse", "stage-1 loss", kind=Choice(*LOSSES))
    loss_scale: float = setting(1000.0, "stage-1 loss multiplier", kind=Number(0.0, low_open=True))
    lora_rank: int = setting(8, "LoRA rank (stage 2)", kind=Integer(1))
    lora_alpha: int = setting(16, "LoRA alpha (stage 2)", kind=Integer(1))
    seed: int = setting(0, "seed", kind=Integer(0))

    def __post_init__(self):
        check_settings(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lora_defaults(**overrides) -> StageSettings:
    """Stage 2 settings: lr 1e-4, LoRA r 8, α 16 (LoLCATs)."""
    return StageSettings(**{"lr": LORA_LR, **overrides})


class StepPair(Kind):
    """``S1[,S2]``: optimiser steps of stage 1 and stage 2 (one number: both)."""

    metavar = "S1[,S2]"

    def parse(self, text: str):
        parts = [part.strip() for part in text.split(",")]
        if len(parts) > 2:
            raise ValueError(f"{text!r} names more than two stages")
        try:
            steps = tuple(int(part) for part in parts)
        except ValueError:
            raise ValueError(f"{text!r} is not S1[,S2] (whole numbers of steps)") from None
        return self.check(steps * 2 if len(steps) == 1 else steps)

    def check(self, value):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{value!r} is not a pair of step counts")
        return tuple(Integer(0).check(steps) for steps in value)


_STAGE1, _STAGE2 = StageSettings(), lora_defaults()


@dataclass
class ConversionSettings:
    """What ``headlab convert`` trains: the conversion (``linear``) of ``layers``, stage 1 (the
    feature maps match each layer's softmax output) and stage 2 (LoRA with next-token loss), on
    windows of ``text.tokens`` tokens of its text (or chat conversations of it, by ``data``); ``text.windows``
    held-out windows measure the validation loss and the perplexities."""

    to: str = setting("hybrid", "plain linear (hedgehog) or the hybrid", kind=Choice("hybrid", "hedgehog"), flag="--to")
    layers: tuple | None = setting(None, "layers to convert, e.g. 2-27 or 3,5,-2 (default: every layer that "
                                         "attends to the whole context; sliding-window layers keep a bounded "
                                         "cache already)",
                                   kind=Maybe(Indices()), flag="--layers")
    linear: LinearSettings = setting(default_factory=LinearSettings)
    sliding: bool = setting(False, "sliding window instead of the terrace (own + previous block)", kind=Switch(),
                            flag="--sliding")
    steps: tuple[int, int] = setting((_STAGE1.steps, _STAGE2.steps), "optimiser steps of stage 1 and stage 2 "
                                     "(one number: both; 0 skips a stage)", kind=StepPair(), flag="--steps")
    loss: str = setting(_STAGE1.loss, "stage-1 loss: per-head output MSE or attention cross-entropy (T x T maps: "
                                      "short --tokens)", kind=Choice(*LOSSES), flag="--loss")
    lr1: float = setting(_STAGE1.lr, "stage-1 learning rate", kind=Number(0.0, low_open=True), flag="--lr1")
    lr2: float = setting(_STAGE2.lr, "stage-2 learning rate", kind=Number(0.0, low_open=True), flag="--lr2")
    stage2_loss: str = setting("ce", "stage-2 loss: next-token cross-entropy (LoLCATs) or the KL divergence to the "
                                     "original model's next-token distribution (RADLADS; one more forward per "
                                     "sequence)", kind=Choice("ce", "kl"), flag="--stage2-loss")
    accumulation: int = setting(_STAGE1.accumulation, "sequences per optimiser step", kind=Integer(1),
                                flag="--accumulation")
    eval_every: int = setting(_STAGE1.eval_every, "steps between validations and checkpoints", kind=Integer(1),
                              flag="--eval-every")
    text: TextWindows = setting(default_factory=lambda: TextWindows(windows=4, tokens=512))
    data: str = setting("text", "train on windows of the text, or on chat conversations: passages of the text with "
                                "a question (half about a fact hidden in the passage) and the original model's own "
                                "answer, through its chat template", kind=Choice(*DATA_KINDS), flag="--data")
    softmax: str | None = setting(None, "rule choosing the KV heads (or layers) of the converted layers that keep "
                                        "softmax attention: a score of --scores (retrieval, razor's echo, duo gates, "
                                        "gradient_importance...), razor, uniform, random (seeded, the control) or kl "
                                        "(greedy: the unit whose softmax lowers the KL to the original model most, "
                                        "after stage 1); default none",
                                  kind=Maybe(Text()), flag="--softmax-heads")
    softmax_unit: str = setting("heads", "what --softmax-heads chooses: KV heads (with their query heads) or whole "
                                         "layers", kind=Choice(*SOFTMAX_UNITS), flag="--softmax-unit")
    softmax_keep: float = setting(0.25, "fraction of the converted layers' KV heads (or layers) kept softmax",
                                  kind=Number(0.0, 1.0), flag="--softmax-keep")
    softmax_cache: float | None = setting(None, "instead of --softmax-keep: as many softmax units as keep the "
                                                "converted model's cache within this fraction of the original's "
                                                "bytes at --cache-length tokens",
                                          kind=Maybe(Number(0.0, 1.0, low_open=True)), flag="--softmax-cache")
    cache_length: int = setting(4096, "length at which cache bytes are counted and reported", kind=Integer(1),
                                flag="--cache-length")
    kl_windows: int = setting(2, "training windows on which the kl rule measures the divergence (the held-out "
                                 "ones measure the result)", kind=Integer(1), flag="--kl-windows")
    gate_lengths: tuple[int, ...] = setting((1024,), "prompt lengths of the recall gate (needle recall inside, just "
                                                     "outside and far from the window, original against converted)",
                                            kind=Items(Integer(64)), flag="--gate-lengths")
    gate_needles: int = setting(6, "held-out needles of the recall gate (one prompt per needle, length and distance)",
                                kind=Integer(1, 6), flag="--gate-needles")
    seed: int = setting(0, "seed", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)
        self.text.require_tokens(8, "conversion training")
        self._check_softmax_options()

    def _check_softmax_options(self) -> None:
        """Refuse softmax-head options that would be ignored, and a KL rule with more windows than training has."""
        defaults = {name: field.default for name, field in self.__dataclass_fields__.items()}
        given = [flag for name, flag in (("softmax_unit", "--softmax-unit"), ("softmax_keep", "--softmax-keep"),
                                         ("softmax_cache", "--softmax-cache"), ("kl_windows", "--kl-windows"))
                 if getattr(self, name) != defaults[name]]
        if self.softmax is None and given:
            raise HeadlabError(f"{', '.join(given)} need(s) --softmax-heads RULE")
        if self.softmax_cache is not None and self.softmax_keep != defaults["softmax_keep"]:
            raise HeadlabError("--softmax-keep and --softmax-cache are two budgets; give one")
        if self.softmax not in (None, "kl") and self.kl_windows != defaults["kl_windows"]:
            raise HeadlabError("--kl-windows is read by --softmax-heads kl only")
        n_train = max(1, max(self.steps) * self.accumulation)
        if self.softmax == "kl" and self.kl_windows > n_train:
            raise HeadlabError(f"--kl-windows {self.kl_windows} is above the {n_train} training windows (--steps x "
                               "--accumulation)")
        if self.steps == (0, 0):
            raise HeadlabError("--steps 0,0 trains nothing: give stage 1 or stage 2 some steps")

    def linear_settings(self, layers: tuple[int, ...] | None) -> LinearSettings:
        """The conversion with the resolved ``layers``."""
        form = "linear" if self.to == "hedgehog" else "hybrid"
        return dataclasses.replace(self.linear, form=form, terrace=not self.sliding, layers=layers)

    def stages(self) -> tuple[StageSettings, StageSettings]:
        common = dict(accumulation=self.accumulation, eval_every=self.eval_every, seed=self.seed)
        return (StageSettings(steps=self.steps[0], lr=self.lr1, loss=self.loss, **common),
                lora_defaults(steps=self.steps[1], lr=self.lr2, **common))


__all__ = ["DATA_KINDS", "FEATURE_INITS", "FEATURE_MAPS", "FORMS", "KVHeadPairs", "LORA_LR", "SOFTMAX_UNITS",
           "ConversionSettings", "LinearSettings", "StageSettings", "lora_defaults"]
