"""headlab.surgeon: everything that touches a live model (loading, the attention hook, edit plans, taps)."""

from .bridge import attach_bridge
from .hook import HOOK_NAME, Session, attach, attention_modules
from .models import (
    BUNDLED,
    ModelShape,
    ModelSpecError,
    UnsupportedModelError,
    bundled_status,
    load_model,
    model_shape,
)
from .plan import EDIT_KINDS, Edit, HeadScale, Plan, PlanError
from .taps import MapBudgetError, Recording, Taps

__all__ = [
    "BUNDLED",
    "EDIT_KINDS",
    "HOOK_NAME",
    "Edit",
    "HeadScale",
    "MapBudgetError",
    "ModelShape",
    "ModelSpecError",
    "Plan",
    "PlanError",
    "Recording",
    "Session",
    "Taps",
    "UnsupportedModelError",
    "attach",
    "attach_bridge",
    "attention_modules",
    "bundled_status",
    "load_model",
    "model_shape",
]
