"""Edited checkpoints: a model and a plan written as a folder that reloads as the edited model.

Two layouts, chosen by the plan. When every edit folds into the weights (:mod:`.folding`: head
scaling, ablation, mean replacement), the folder is a plain Hugging Face checkpoint of the edited
model, which transformers loads without headlab, plus :data:`EDITED_FILE` (the plan, the base model,
the largest logit difference between the reloaded folder and the live plan, measured before the
folder was moved into place). Otherwise (calibration, steering, streaming, redistribution: edits
that read the input) the folder holds the unedited model under :data:`BASE_FOLDER`, the plan as
:data:`PLAN_FILE` and :data:`EDITED_FILE`; :func:`~.models.load_model` reloads it with the plan
installed (:func:`~.hook.install`), and plain transformers refuses it (no ``config.json`` at the
top) instead of loading the model unedited.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import HeadlabError, InputFileError, ModelSpecError
from ..core.files import (
    OWNED_MANIFEST,
    claim_folder,
    owned_entries,
    parse_json,
    usual_modes,
    record_owned,
    write_json,
)
from ..core.shape import text_config
from .folding import Folded, fold_plan
from .hook import attach, install, installed_plan
from .plan import Plan

EDITED_FILE = "headlab_edit.json"
BASE_FOLDER = "base"
PLAN_FILE = "plan.json"
FORMAT = "headlab-edited/1"
PROBE_TOKENS = 24  # length of the random input the folded weights are checked on


@dataclass
class EditedCheckpoint:
    """What :func:`save_edited` wrote: the ``directory``, its ``layout`` (``"folded"``: a plain
    checkpoint; ``"hooked"``: the unedited model and the whole plan), the edits folded into the
    weights, the plan the hook runs on reload (empty when folded), why edits could not fold, and the largest logit
    difference of the reloaded folded weights from the live plan (None for the hooked layout)."""

    directory: Path
    layout: str
    folded: list = field(default_factory=list)
    kept: Plan = field(default_factory=Plan)
    reasons: list[str] = field(default_factory=list)
    max_logit_difference: float | None = None


def save_edited(model, tokenizer, plan: Plan, directory: str | os.PathLike, *, overwrite: bool = False,
                provenance: dict | None = None) -> EditedCheckpoint:
    """Write ``model`` edited by ``plan`` (after any plan installed on it) as a checkpoint folder that
    reloads to the same logits as the live plan (see the module docstring); ``directory`` is new,
    empty or headlab's (``overwrite``: any). The model is left as it was."""
    from .conversion.converted import converted_layers

    if converted_layers(model):
        raise HeadlabError("this model has layers converted to linear attention; a converted checkpoint is saved "
                           "by 'headlab convert' (apply plans to the softmax model before converting)")
    plan = (installed_plan(model) or Plan()).then(plan).bound_to(model)
    folded = fold_plan(model, plan)
    layout = "hooked" if folded.kept.edits else "folded"
    directory = Path(directory).expanduser()
    claim_folder(directory, (), overwrite, "checkpoint folder")
    with tempfile.TemporaryDirectory(prefix=".save.", dir=directory) as tmp:
        tmp = Path(tmp)
        difference = None
        if layout == "folded":
            _write_folded(model, folded, tmp)
            difference = _check_folded(model, plan, tmp)
        else:
            _write_model(model, model.state_dict(), model.config, tmp / BASE_FOLDER)
            write_json(tmp / PLAN_FILE, plan.to_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp if layout == "folded" else tmp / BASE_FOLDER)
        usual_modes(tmp)
        _move_into_place(tmp, directory)
    folded_edits = folded.folded if layout == "folded" else []
    record = {"format": FORMAT, "layout": layout, "base_model": plan.model, "plan": plan.to_dict(),
              "folded": [e.to_dict() for e in folded_edits], "kept_because": folded.reasons,
              "config_switches": folded.config, "max_logit_difference": difference,
              "headlab": importlib.metadata.version("headlab"), "torch": torch.__version__,
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **(provenance or {})}
    write_json(directory / EDITED_FILE, record)  # last: the folder is an edited checkpoint once it is complete
    return EditedCheckpoint(directory, layout, folded_edits, plan if layout == "hooked" else Plan(), folded.reasons,
                            difference)


def is_edited_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder :func:`save_edited` wrote."""
    return (Path(path) / EDITED_FILE).is_file()


def read_edited(path: str | os.PathLike) -> dict:
    """The record of an edited checkpoint (:data:`EDITED_FILE`), checked: its format, and for the
    hooked layout the base folder and the plan file."""
    path = Path(path)
    try:
        record = parse_json((path / EDITED_FILE).read_text(encoding="utf-8"), str(path / EDITED_FILE))
    except (OSError, UnicodeDecodeError, InputFileError) as err:
        raise ModelSpecError(f"cannot read {path / EDITED_FILE}: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("layout") not in ("folded",
                                                                                                       "hooked"):
        raise ModelSpecError(f"{path / EDITED_FILE} is not a headlab edited-checkpoint record ({FORMAT})")
    if record["layout"] == "hooked":
        for needed in (path / BASE_FOLDER / "config.json", path / PLAN_FILE):
            if not needed.is_file():
                raise ModelSpecError(f"edited checkpoint {path} lacks {needed.relative_to(path)}; it is incomplete")
    return record


def hooked_base(path: str | os.PathLike) -> Path | None:
    """The base model folder of an edited checkpoint whose edits run in the hook, or None for any
    other folder (a folded checkpoint loads as it is)."""
    path = Path(path)
    if not is_edited_directory(path) or read_edited(path)["layout"] != "hooked":
        return None
    return path / BASE_FOLDER


def install_saved_plan(model, path: str | os.PathLike) -> None:
    """Install the plan of the hooked edited checkpoint at ``path`` on its reloaded base ``model``."""
    install(model, Plan.load(Path(path) / PLAN_FILE))


def _write_folded(model, folded: Folded, folder: Path) -> None:
    """The model with ``folded``'s weights and config switches, as a plain checkpoint in ``folder``."""
    state = {**model.state_dict(), **folded.state}
    config = model.config
    if folded.config:
        config = type(config).from_dict(config.to_dict())
        for switch, value in folded.config.items():
            setattr(text_config(config), switch, value)
    _write_model(model, state, config, folder)


def _write_model(model, state: dict, config, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state)
    config.save_pretrained(folder)


def _check_folded(model, plan: Plan, folder: Path) -> float:
    """The largest logit difference between the folded checkpoint in ``folder``, loaded by plain
    transformers, and the live model under ``plan`` on a random input; :class:`HeadlabError` when it
    is larger than rounding explains (2^-12 of the logits' size in fp32, 2^-5 in lower precision)."""
    experts = getattr(model.config, "_experts_implementation", None)  # as the live model runs its experts
    reloaded = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype,
                                           **({"experts_implementation": experts} if experts else {})).eval()
    vocab = text_config(model.config).vocab_size
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with attach(model, plan):
            live = model(ids)[0].to(torch.float64)
        saved = reloaded(ids)[0].to(torch.float64)
    difference = float((saved - live).abs().max())
    precise = next(model.parameters()).dtype in (torch.float32, torch.float64)
    allowed = (2**-12 if precise else 2**-5) * (1 + float(live.abs().max()))
    if not difference <= allowed:
        raise HeadlabError(f"the folded weights give logits {difference:.3g} away from the live plan (allowed "
                           f"{allowed:.3g}); nothing was written")
    return difference


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Move every entry of ``tmp`` into ``directory``, recorded as headlab's; entries an earlier save
    wrote that this one does not (the other layout's) are removed, so the layouts never mix."""
    names = sorted(entry.name for entry in tmp.iterdir())
    stale = owned_entries(directory) - set(names) - {OWNED_MANIFEST, EDITED_FILE}
    (directory / EDITED_FILE).unlink(missing_ok=True)  # the folder is not a checkpoint while it changes
    for name in stale:
        target = directory / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    record_owned(directory, [*names, EDITED_FILE])
    for name in names:
        target = directory / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)


__all__ = ["BASE_FOLDER", "EDITED_FILE", "EditedCheckpoint", "PLAN_FILE", "hooked_base", "install_saved_plan",
           "is_edited_directory", "read_edited", "save_edited"]
