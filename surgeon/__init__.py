"""headlab.surgeon: everything that touches a live model (loading, the attention hook, edit plans, taps)."""

from ..core.lazy import lazy_exports

_EXPORTS = {
    "apply": "hook",
    "attach": "hook",
    "attach_bridge": "bridge",
    "attention_modules": "sites",
    "BUNDLED": "models",
    "bundled_status": "models",
    "Calibrate": "edit_kinds",
    "decoder_layers": "sites",
    "detect_sink_dimensions": "references",
    "Edit": "edit",
    "EditCall": "edit",
    "EDIT_KINDS": "edit",
    "register_edit": "edit",
    "head_output_means": "references",
    "HeadMean": "edit_kinds",
    "HeadScale": "edit_kinds",
    "HOOK_NAME": "hook",
    "load_model": "models",
    "MapBudgetError": "taps",
    "model_directory": "models",
    "model_shape": "headlab.core.shape",
    "ModelShape": "headlab.core.shape",
    "ModelSpecError": "headlab.core.errors",
    "Plan": "plan",
    "PlanError": "plan",
    "Recording": "taps",
    "Redistribute": "edit_kinds",
    "reference_outputs": "references",
    "Reinforce": "edit_kinds",
    "Request": "request",
    "RequestState": "request",
    "search": "search",
    "Session": "hook",
    "Steer": "edit_kinds",
    "Stream": "edit_kinds",
    "Uniform": "edit_kinds",
    "Taps": "taps",
    "UnsupportedModelError": "headlab.core.errors",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
