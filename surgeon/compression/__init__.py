"""KV-cache compression by presses: the settings (:mod:`.settings`), token scorers (:mod:`.scorers`),
one budget axis for every rule (:mod:`.budget`), head-level allocations and whole heads
(:mod:`.press`), and a cache whose KV heads hold their own positions (:mod:`.cache`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {
    "PressSettings": "settings", "KVPress": "press", "TOKEN_SCORERS": "scorers", "token_scorer": "scorers",
    "HeadBudget": "budget", "cache_bytes_at": "budget", "head_budget": "budget",
    "CompressedLayer": "cache", "compressed_cache": "cache",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
