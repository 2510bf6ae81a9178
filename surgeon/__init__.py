"""headlab.surgeon: everything that touches a live model (loading, the attention hook, edit plans, taps)."""

from .bridge import attach_bridge
from . import search
from .edit_kinds import Calibrate, HeadMean, Redistribute, Reinforce, Steer
from .hook import HOOK_NAME, Session, apply, attach, attention_modules, decoder_layers
from .models import (
    BUNDLED,
    ModelShape,
    ModelSpecError,
    UnsupportedModelError,
    bundled_status,
    load_model,
    model_directory,
    model_shape,
)
from .plan import EDIT_KINDS, Edit, HeadScale, Plan, PlanError
from .references import detect_sink_dimensions, head_output_means, reference_outputs
from .request import Request, RequestState
from .taps import MapBudgetError, Recording, Taps

__all__ = [
    "BUNDLED", "EDIT_KINDS", "HOOK_NAME", "Calibrate", "Edit", "HeadMean", "HeadScale", "MapBudgetError",
    "ModelShape", "ModelSpecError", "Plan", "PlanError", "Recording", "Redistribute", "Reinforce", "Request",
    "RequestState", "Session", "Steer", "Taps", "UnsupportedModelError", "apply", "attach", "attach_bridge",
    "attention_modules", "bundled_status", "decoder_layers", "detect_sink_dimensions", "head_output_means",
    "load_model", "model_directory", "model_shape", "reference_outputs",
]
