"""headlab.surgeon: everything that touches a live model (loading, the attention hook, edit plans, taps)."""

from ..core.lazy import lazy_exports

_EXPORTS = {
    "attach": "hook",
    "attach_bridge": "bridge",
    "attention_modules": "sites",
    "BUNDLED": "models",
    "bundled_status": "models",
    "Calibrate": "edits",
    "decoder_layers": "sites",
    "detect_sink_dimensions": "references",
    "Edit": "edits",
    "EditCall": "edits",
    "EDIT_KINDS": "edits",
    "register_edit": "edits",
    "head_output_means": "references",
    "HeadMean": "edits",
    "HeadScale": "edits",
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
    "Redistribute": "edits",
    "reference_outputs": "references",
    "Reinforce": "edits",
    "Request": "request",
    "RequestState": "request",
    "search": "search",
    "Session": "hook",
    "Steer": "edits",
    "Stream": "edits",
    "Uniform": "edits",
    "Taps": "taps",
    "UnsupportedModelError": "headlab.core.errors",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
