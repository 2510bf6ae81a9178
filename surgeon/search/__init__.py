"""Choice tasks, evaluation and ACT's head search: the tasks (:mod:`.tasks`), accuracy and held-out
loss (:mod:`.evaluate`), the search for the heads calibration helps (:mod:`.calibration`, measuring
each head from the stream entering its layer, :mod:`.prefix`, and from its first sink on,
:mod:`.suffix`) and their settings (:mod:`.settings`)."""

from importlib import import_module

_EXPORTS = {
    "CalibrationSettings": "settings", "SearchSettings": "calibration", "calibration_search": "calibration",
    "default_candidates": "calibration", "plan_from_search": "calibration",
    "heldout_loss": "evaluate", "choice_logprobs": "evaluate", "EvalResult": "evaluate",
    "Example": "tasks", "load_task": "tasks", "BUILTIN_TASKS": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # loaded on first use: the settings alone cost no torch
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
