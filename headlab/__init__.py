"""headlab: surgery on, and interpretation of, the attention heads of pretrained transformers."""

from ._version import __version__
from .surgeon import HeadScale, Plan, Taps, attach, load_model, model_shape

__all__ = ["HeadScale", "Plan", "Taps", "__version__", "attach", "load_model", "model_shape"]
