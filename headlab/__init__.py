"""headlab: surgery on, and interpretation of, the attention heads of pretrained transformers."""

from importlib import import_module

from ._version import __version__

_EXPORTS = ("HeadScale", "Plan", "Taps", "attach", "load_model", "model_shape", "save_edited")  # from headlab.surgeon
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):  # loaded on first use, so that `headlab --help` imports no torch
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module("headlab.surgeon"), name)


def __dir__():
    return __all__
