"""The attention geometry of a model, read from its config (no torch needed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry of a model: what plans and head scores are indexed by."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size ``g``)."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)


def text_config(config):
    """The config that holds the attention geometry (the language model's, for multimodal models)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def model_shape(model_or_config) -> ModelShape:
    """Layers, query heads, KV heads and head dimension of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    cfg = text_config(config)
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return ModelShape(cfg.num_hidden_layers, n_heads, n_kv, head_dim)


__all__ = ["ModelShape", "model_shape", "text_config"]
