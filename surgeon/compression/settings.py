"""Settings of a KV-cache press (:class:`PressSettings`): which token scorer, how large a budget on one
axis for every rule (a fraction of the cache's bytes at the prompt's length, or tokens per KV head),
how the budget is split between heads, and when the cache is compressed. One definition for the
library and the command line; importing this module costs no torch."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import HeadlabError
from ...core.kinds import Choice, Integer, Maybe, Number, Switch, Text
from ...core.settings import check_settings, setting

ALLOCATIONS = ("uniform", "pool", "scores")
ALLOCATION_HELP = ("how the budget is split between the compressed KV heads: uniform (the same count each), pool "
                   "(Ada-KV: one top-k over the heads of a layer, each keeping at least a fifth of an even share) or "
                   "scores (HeadKV: a fifth of an even share each, the rest in proportion to a head score of --scores, "
                   "named by --rule)")


@dataclass
class PressSettings:
    """A press: ``scorer`` ranks the held keys of every compressed KV head; the cache keeps ``budget``
    (a fraction of the uncompressed cache's bytes at the prompt's length, every layer counted) or
    ``tokens`` (held positions per KV head, on average over the global layers). ``whole``: the fraction
    of global KV heads that a ``rule`` (a head score's name, razor or random) ranks highest keep every
    position (DuoAttention, RazorAttention); every other head keeps its ``sinks`` first tokens, its
    ``window`` latest and, of the rest, what the scorer ranks highest as ``allocation`` shares out the
    remaining budget. ``query_aware``: the question is in the compressed prefill (otherwise the context
    is compressed before the question is seen). ``slack``: while decoding, a layer is compressed back
    to its budget once it holds this many positions more (0: never during decoding)."""

    scorer: str = setting("snapkv", "token scorer: streaming_llm, snapkv, tova, knorm, expected_attention or random",
                          kind=Text(), flag="--scorer")
    budget: float | None = setting(0.35, "fraction of the uncompressed cache's bytes kept at the prompt's length",
                                   kind=Maybe(Number(0.0, 1.0, low_open=True)), flag="--budget")
    tokens: int | None = setting(None, "positions kept per KV head on average (instead of --budget)",
                                 kind=Maybe(Integer(1)), flag="--tokens")
    allocation: str = setting("uniform", ALLOCATION_HELP, kind=Choice(*ALLOCATIONS), flag="--allocation")
    whole: float = setting(0.0, "fraction of global KV heads that keep every position (ranked by --rule)",
                           kind=Number(0.0, 1.0), flag="--whole")
    rule: str | None = setting(None, "head score ranking the whole heads (and weighting --allocation scores): a score "
                                     "name of --scores, razor or random", kind=Maybe(Text()), flag="--rule")
    sinks: int = setting(4, "first tokens every compressed head keeps", kind=Integer(0), flag="--sinks")
    window: int = setting(32, "latest positions every compressed head keeps", kind=Integer(0), flag="--window")
    observation: int = setting(32, "queries a scorer reads (SnapKV's observation window)", kind=Integer(1),
                               flag="--observation")
    pooling: int = setting(5, "SnapKV's pooling kernel over neighbouring keys (1: none)", kind=Integer(1),
                           flag="--pooling")
    query_aware: bool = setting(False, "compress after the question is in the cache (otherwise before)",
                                kind=Switch(), flag="--query-aware")
    slack: int = setting(32, "decoding: positions a layer may gain before it is compressed again (0: never)",
                         kind=Integer(0), flag="--slack")
    seed: int = setting(0, "seed of the random scorer and the random rule", kind=Integer(0), flag="--seed")

    def __post_init__(self):
        check_settings(self)
        if (self.budget is None) == (self.tokens is None):
            raise HeadlabError("a press needs exactly one of --budget (a fraction of the cache) and --tokens")
        if (self.whole > 0 or self.allocation == "scores") and self.rule is None:
            raise HeadlabError("--whole and --allocation scores need --rule (the head score that ranks the heads)")
        if self.pooling % 2 == 0:
            raise HeadlabError(f"--pooling {self.pooling}: the pooling kernel is centred, so it must be odd")

    def label(self) -> str:
        """A short name of the press for tables and figures."""
        parts = [self.scorer]
        if self.whole:
            parts.append(f"{self.rule} {self.whole:.0%} whole, window {self.window}")
        if self.allocation != "uniform":
            parts.append(self.allocation if self.allocation == "pool" else f"{self.rule}-weighted")
        parts.append("query-aware" if self.query_aware else "query-agnostic")
        return ", ".join(parts)


__all__ = ["ALLOCATIONS", "ALLOCATION_HELP", "PressSettings"]
