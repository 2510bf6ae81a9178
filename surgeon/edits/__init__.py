"""Edits of attention: what an edit kind is (:mod:`.base`: the ``Edit`` base, the registry, the view of
one layer call), the pure tensor math of every edit (:mod:`.formulas`), running a layer call's edits
stage by stage (:mod:`.stages`), and one module per built-in kind. Importing the package registers the
built-in kinds."""

from .base import EDIT_KINDS, FIRST_EDITABLE_LAYER, STAGES, Edit, EditCall, register_edit
from .calibrate import Calibrate
from .head_mean import HeadMean
from .head_scale import HeadScale
from .redistribute import Redistribute
from .reinforce import Reinforce
from .steer import Steer
from .stream import Stream
from .uniform import Uniform

__all__ = ["EDIT_KINDS", "FIRST_EDITABLE_LAYER", "STAGES", "Calibrate", "Edit", "EditCall", "HeadMean", "HeadScale",
           "Redistribute", "Reinforce", "Steer", "Stream", "Uniform", "register_edit"]
