"""Choice tasks, their accuracy and ACT's head search: the tasks (:mod:`.tasks`), choice scores and
accuracy (:mod:`.accuracy`), the search for the heads calibration helps (:mod:`.calibration`, measuring
each head from the stream entering its layer, :mod:`.prefix`, and from its first sink on,
:mod:`.suffix`) and their settings (:mod:`.settings`)."""

from ...core.lazy import lazy_exports

_EXPORTS = {
    "CalibrationSettings": "settings", "SearchSettings": "calibration", "calibration_search": "calibration",
    "default_candidates": "calibration", "plan_from_search": "calibration",
    "choice_logprobs": "accuracy", "EvalResult": "accuracy",
    "Example": "tasks", "load_task": "tasks", "BUILTIN_TASKS": "tasks",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
