"""Converting softmax attention to Hedgehog linear or LoLCATs hybrid attention: the settings
(:mod:`.settings`), the feature maps (:mod:`.hedgehog`), the converted layer (:mod:`.layer`),
which layers convert (:mod:`.support`), conversion and checkpoints (:mod:`.converted`) and the
two training stages (:mod:`.training`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {
    "ConversionSettings": "settings", "LinearSettings": "settings", "StageSettings": "settings",
    "FeatureMap": "hedgehog", "LinearAttention": "layer", "RecurrentState": "layer",
    "check_config": "support", "convertible_layers": "support", "verify_layers": "support",
    "convert": "converted", "converted_layers": "converted", "is_converted_directory": "converted",
    "load_converted": "converted", "save_converted": "converted",
    "run_stage": "training",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
