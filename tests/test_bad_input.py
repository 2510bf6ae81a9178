"""Bad input on the command line and in the Python API: every case ends in one clear line (exit
status 2 on the command line, a :class:`HeadlabError` in the API), never a traceback, before any
expensive work, and changes no file: the sandbox of user files and inputs is compared byte for byte
before and after each case (nothing written, nothing created, even under ``--out``).

Every option of every command appears in at least one case (checked against the parser).
"""

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from headlab.core.text import TextWindows
from headlab.cli import build_parser, main
from headlab.probes.figures import plotly_file_name
from headlab.commands.common import Renamed
from headlab.core.head_scores import HeadScores
from headlab.surgeon.conversion.settings import LinearSettings
from headlab.core.errors import HeadlabError
from headlab.core.journal import Journal
from headlab.surgeon.models import load_config

SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder of user files and inputs, good and bad, shared by the cases."""
    d = tmp_path_factory.mktemp("sandbox")
    (d / "user.txt").write_text("the user's own notes\n")
    (d / "precious").mkdir()
    (d / "precious" / "scores.json").write_text('{"mine": true}\n')
    (d / "own_plotly").mkdir()  # a plotly.js of the user's own where headlab's pages would put theirs
    (d / "own_plotly" / plotly_file_name()).write_text("// the user's own build\n")
    (d / "text.txt").write_text("Some text to look at. " * 20)
    (d / "windows_only.txt").write_text("Some text to look at. " * 450)  # 8 windows of 256 tokens, no 4096-token needle
    (d / "blank.txt").write_text("  \n\n ")
    (d / "latin1.txt").write_bytes("Caf\xe9 au lait.".encode("latin-1"))
    task = {"prompt": "Q: 1+1 =", "choices": [" 2", " 3"], "label": 0}
    good_task = json.dumps(task) + "\n" + json.dumps({**task, "label": 1}) + "\n"
    for name, line in {"str_choices": {**task, "choices": "abc"}, "label_float": {**task, "label": 1.9},
                       "label_true": {**task, "label": True}, "empty_choices": {**task, "choices": []},
                       "array": [1, 2], "unknown_key": {**task, "extra": 1}}.items():
        (d / f"tasks_{name}.jsonl").write_text(json.dumps(line) + "\n" + good_task)
    shape = {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64}
    plan = {"format": "headlab-plan/1", "model": SMOL, "shape": shape,
            "edits": [{"kind": "head_scale", "layer": 5, "heads": [1], "scale": 0.0}]}
    edit = plan["edits"][0]
    for name, data in {"layer_str": {**edit, "layer": "5"}, "layer_float": {**edit, "layer": 5.5},
                       "heads_str": {**edit, "heads": "12"}, "scale_nan": {**edit, "scale": math.nan},
                       "scale_huge": {**edit, "scale": 1e30}}.items():
        (d / f"plan_{name}.json").write_text(json.dumps({**plan, "edits": [data]}))
    (d / "plan_edits_str.json").write_text(json.dumps({**plan, "edits": "abc"}))
    (d / "plan_unknown_shape.json").write_text(json.dumps({**plan, "shape": {**shape, "colour": 1}}))
    (d / "plan_wrong_shape.json").write_text(json.dumps({**plan, "shape": {**shape, "n_layers": 12}}))
    (d / "plan_calibrate_nan.json").write_text(json.dumps({**plan, "edits": [
        {"kind": "calibrate", "layer": 5, "heads": [1], "threshold": math.nan}]}))
    (d / "probe_lists.jsonl").write_text(json.dumps({"text": "a b", "label": [1, 2]}) + "\n")
    values = torch.rand(30, 9, generator=torch.Generator().manual_seed(0))
    score = HeadScores("retrieval", values, torch.ones(30, 9), SMOL).to_dict()
    (d / "scores.json").write_text(json.dumps({"format": "headlab-scores/1", "scores": {"retrieval": score}}))
    (d / "scores_other.json").write_text(json.dumps({"format": "headlab-scores/1", "scores": {"retrieval": {
        **score, "values": [[v + 1 for v in row] for row in score["values"]]}}}))
    (d / "scores_another.json").write_text(json.dumps({"format": "headlab-scores/1", "scores": {
        "retrieval": HeadScores("retrieval", values, torch.ones(30, 9), "another-model").to_dict()}}))
    text = json.dumps({"format": "headlab-scores/1", "scores": {"retrieval": score}})
    (d / "scores_duplicate.json").write_text(text.replace('"scores": {', '"scores": {"retrieval": {}, ', 1))
    (d / "plan_duplicate.json").write_text(json.dumps(plan).replace('"model": ', '"model": "other", "model": ', 1))
    (d / "scores_bad.json").write_text(json.dumps({"scores": {"retrieval": {**score, "values": [[1, 2], [3]]}}}))
    (d / "scores_shape.json").write_text(json.dumps({"scores": {"retrieval": HeadScores(
        "retrieval", torch.rand(4, 3), torch.ones(4, 3), "x").to_dict()}}))
    converted = d / "converted"  # what headlab convert writes but the weights: enough to be refused
    load_config(SMOL)[1].save_pretrained(converted)
    (converted / "headlab_conversion.json").write_text(json.dumps(
        {"format": "headlab-conversion/1", "settings": LinearSettings(layers=(3, 4)).to_dict(), "provenance": {}}))
    lost_base = d / "converted_lost_base"  # a checkpoint whose base folder is gone
    shutil.copytree(converted, lost_base)
    (lost_base / "headlab_conversion.json").write_text(json.dumps(
        {"format": "headlab-conversion/1", "settings": LinearSettings(layers=(3, 4)).to_dict(),
         "provenance": {"base_model": str(d / "gone")}}))
    stray = d / "stray_report"
    stray.mkdir()
    (stray / "validation-x.json").write_text(json.dumps({"format": "headlab-masking-curve/2", "score": "x",
                                                          "metric": "loss"}))  # no "k" and more
    (stray / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1",
                                                            "entries": ["validation-x.json"]}))
    damaged = d / "stray_compression"
    damaged.mkdir()
    (damaged / "compression.json").write_text(json.dumps({"format": "headlab-compression/1",
                                                          "summary": [{"rule": "random", "keep": 2}]}))
    (damaged / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1",
                                                              "entries": ["compression.json"]}))
    stale = d / "stale_progress"  # stream-eval's and validate's progress files of other evaluations
    stale.mkdir()
    for kind, name in (("compression", "compression"), ("validation", "validation-retrieval")):
        Journal(stale / f"{name}.progress.json", {"kind": "other"}, kind).put("piece", 1)
    (stale / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1", "entries": [
        "compression.progress.json", "validation-retrieval.progress.json"]}))
    edited = d / "edited_progress"  # progress files whose numbers were set by hand
    edited.mkdir()
    for kind, name in (("compression", "compression"), ("validation", "validation-retrieval")):
        Journal(edited / f"{name}.progress.json", {"kind": "other"}, kind).put("piece", {"recall": 0.5})
        data = json.loads((edited / f"{name}.progress.json").read_text())
        data["pieces"]["piece"]["recall"] = 0.987654
        (edited / f"{name}.progress.json").write_text(json.dumps(data))
    stray_atlas = d / "stray_atlas"
    stray_atlas.mkdir()
    (stray_atlas / "atlas.json").write_text(json.dumps({"format": "something-else"}))
    (stray_atlas / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1", "entries": ["atlas.json"]}))
    _sae_folders(d)
    _hostile_files(d)
    tiny = tiny_llama("gqa")
    tiny.save_pretrained(d / "tinymodel")
    _converted_folder(d / "tinyconverted")
    _pickled_model(tiny, d / "pickled")
    return d


def _sae_folders(d: Path) -> None:
    from headlab.sae import SparseAutoencoder, save_sae

    save_sae(SparseAutoencoder(576, 1152, "topk", 8, 9, 64), d / "sae", SMOL, 3, "LlamaAttention o_proj input", 64)
    (d / "sae_empty").mkdir()
    for name in ("sae_no_d_in", "sae_d_sae", "sae_truncated", "sae_truncated_unrecorded", "sae_layer_edited"):
        shutil.copytree(d / "sae", d / name)
    cfg = json.loads((d / "sae" / "cfg.json").read_text())
    (d / "sae_no_d_in" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_in"}))
    (d / "sae_d_sae" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 2000}))
    (d / "sae_layer_edited" / "cfg.json").write_text(json.dumps({**cfg, "headlab": {**cfg["headlab"], "layer": 5}}))
    unrecorded = {k: v for k, v in cfg["headlab"].items() if k != "weights_sha256"}  # as headlab wrote before 2026-12
    (d / "sae_truncated_unrecorded" / "cfg.json").write_text(json.dumps({**cfg, "headlab": unrecorded}))
    for name in ("sae_truncated", "sae_truncated_unrecorded"):
        weights = d / name / "sae_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    acts = d / "acts_layer3"  # an activation cache of layer 3 (its one shard left out)
    acts.mkdir()
    identity = {"model": SMOL, "layer": 3, "exclude_first": True, "text": "Python standard-library docstrings",
                "context": 128, "train_windows": 1575, "held_out_windows": 16, "seed": 0}
    (acts / "manifest.json").write_text(json.dumps({"format": "headlab-activations/2", "n_heads": 9, "d_head": 64,
                                                    "tokens": 0, "identity": identity, "shards": []}))
    (acts / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1", "entries": ["manifest.json"]}))


def _hostile_files(d: Path) -> None:
    """Files built to hang, exhaust or escape a reader, and the damaged and mismatched files of the
    kinds that have none above (see FILE_KINDS)."""
    import os

    deep = "[" * 100_000 + "]" * 100_000
    (d / "scores_deep.json").write_text(deep)
    (d / "probe_deep.jsonl").write_text(deep + "\n")
    os.mkfifo(d / "plan_fifo.json")  # reading it would wait forever for a writer
    os.mkfifo(d / "tasks_fifo.jsonl")
    with (d / "huge.txt").open("wb") as huge:  # 300 MiB of NUL bytes (valid UTF-8), sparse on disk
        huge.truncate(300 * 2**20)
    (d / "probe_as_tasks.jsonl").write_text(json.dumps({"text": "a b", "label": 1}) + "\n")
    shutil.copytree(d / "sae", d / "sae_deep")
    (d / "sae_deep" / "cfg.json").write_text(deep)
    identity = {"model": SMOL, "layer": 3, "exclude_first": True, "text": "Python standard-library docstrings",
                "context": 128, "train_windows": 1575, "held_out_windows": 16, "seed": 0}
    for name, shard in (("acts_damaged", "shard-00000.safetensors"), ("acts_escape", "../user.txt")):
        folder = d / name
        folder.mkdir()
        (folder / "shard-00000.safetensors").write_bytes(bytes(50))  # the manifest says 100 bytes
        (folder / "manifest.json").write_text(json.dumps({
            "format": "headlab-activations/2", "n_heads": 9, "d_head": 64, "tokens": 10, "identity": identity,
            "shards": [{"file": shard, "bytes": 100, "sha256": "0" * 64}]}))
        (folder / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1", "entries": [
            "manifest.json", "shard-00000.safetensors"]}))
    _gate_states(d)


def _gate_states(d: Path) -> None:
    """train-gates output folders holding a damaged state, another training's and a pickle that is
    more than tensors."""
    from headlab.surgeon.streaming.gates import STATE_FILE, settings_key
    from headlab.surgeon.streaming.settings import GateSettings

    other = {"settings": settings_key(GateSettings(lam=0.5)), "step": 1, "seconds": 0.0, "history": [],
             "alphas": torch.ones(30, 3), "optimizer": {}}
    states = {"gates_damaged": b"not a torch file", "gates_other": other, "gates_pickle": {"payload": _NotATensor()}}
    for name, state in states.items():
        (d / name).mkdir()
        if isinstance(state, bytes):
            (d / name / STATE_FILE).write_bytes(state)
        else:
            torch.save(state, d / name / STATE_FILE)
        (d / name / ".headlab-owned.json").write_text(json.dumps({"format": "headlab-owned/1",
                                                                  "entries": [STATE_FILE]}))


def _converted_folder(folder: Path) -> None:
    """A tiny checkpoint with layer 0 converted to linear attention."""
    from headlab.surgeon.conversion import LinearSettings, convert
    from headlab.surgeon.conversion.converted import save_converted

    model = tiny_llama("gqa")
    convert(model, LinearSettings(layers=(0,)))
    model.config.architectures = ["LlamaForCausalLM"]  # as a checkpoint converted from a saved model records
    save_converted(model, None, folder)
    truncated = folder.with_name(folder.name + "_truncated")
    shutil.copytree(folder, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    beyond = folder.with_name(folder.name + "_layer99")
    shutil.copytree(folder, beyond)
    marker = json.loads((beyond / "headlab_conversion.json").read_text())
    marker["settings"]["layers"] = [99]
    (beyond / "headlab_conversion.json").write_text(json.dumps(marker))


class _NotATensor:
    pass


def _pickled_model(model, folder: Path) -> None:
    """A model folder whose weights are a pickle carrying an object beyond tensors."""
    model.config.save_pretrained(folder)
    state = dict(model.state_dict())
    state["payload"] = _NotATensor()
    torch.save(state, folder / "pytorch_model.bin")


# (command line, fragment of the one error line); {d} is the sandbox
CLI_CASES = [
    # report
    (f"report {SMOL} --out {{d}}/r --windows 0", "--windows"),
    (f"report {SMOL} --out {{d}}/r --samples 2", "--samples is spelled --windows now"),
    (f"report {SMOL} --out {{d}}/r --scores induction", "--scores is spelled --families now"),
    (f"report {SMOL} --out {{d}}/r --tokens 3", "--tokens"),
    (f"report {SMOL} --out {{d}}/r --seed -1", "--seed"),
    (f"report {SMOL} --out {{d}}/r --text-file {{d}}/missing.txt", "does not exist"),
    (f"report {SMOL} --out {{d}}/r --text-file {{d}}", "is not a file"),
    (f"report {SMOL} --out {{d}}/r --text-file {{d}}/latin1.txt", "is not UTF-8 text (byte 3"),
    (f"report {SMOL} --out {{d}}/r --text-file {{d}}/blank.txt", "holds no text"),
    (f"report {SMOL} --out {{d}}/r --text-file {{d}}/text.txt", "too short for 8 windows of 256 tokens"),
    (f"report {SMOL} --out {{d}}/r --text-file {{d}}/windows_only.txt", "needed for needle length 4096"),
    (f"report {SMOL} --out {{d}}/r --needle-lengths 90000", "needed for needle length 90000"),
    (f"report {SMOL} --out {{d}}/r --views -1", "--views"),
    (f"report {SMOL} --out {{d}}/r --page-only", "holds no scores.json: --page-only rewrites the pages"),
    # a converted checkpoint, for work that edits softmax attention in every layer
    ("validate {d}/converted --scores {d}/scores.json --out {d}/v", "has layers converted to linear attention (3, 4)"),
    ("stream-plan {d}/converted --scores {d}/scores.json --keep 0.5 --out {d}/sp.json",
     "a plan of streaming heads needs softmax attention in every layer"),
    ("stream-eval {d}/converted --scores {d}/scores.json --out {d}/se", "--scores (streaming heads) do not apply"),
    ("stream-eval {d}/converted --rules random --keeps 0.5 --out {d}/se", "--rules, --keeps (streaming heads)"),
    ("stream-eval {d}/converted --out {d}/se", "does not record the model it was converted from: give --base"),
    ("stream-eval {d}/converted --base {d}/tinymodel --out {d}/se", "in shape and vocabulary size; give the model it"),
    ("stream-eval {d}/converted --base {d}/converted --out {d}/se", "is itself converted to linear attention"),
    ("stream-eval {d}/converted --base minilm-l6 --out {d}/se", "the base of a converted checkpoint needs one"),
    ("stream-eval {d}/converted --base {d}/missing --out {d}/se", "does not exist"),
    ("stream-eval {d}/converted_lost_base --out {d}/se", "/gone', cannot be read (model folder"),
    (f"stream-eval {SMOL} --base {SMOL} --rules random --out {{d}}/se", "--base is for a checkpoint converted"),
    (f"stream-eval {SMOL} --rules random --out {{d}}/stale_progress", "holds a compression of other settings"),
    (f"stream-eval {SMOL} --rules random --out {{d}}/own_plotly --overwrite", "headlab did not write it"),
    (f"stream-eval {SMOL} --rules random --out {{d}}/edited_progress", "was changed after headlab wrote it"),
    (f"report {SMOL} --out /proc/headlab-report", "cannot write the --out report folder into /proc"),
    (f"view {SMOL} --text abc --out /sys/view.html", "into /sys (Permission denied)"),
    (f"stream-eval {SMOL} --rules random --out /proc/self/e", "cannot write"),
    (f"validate {SMOL} --scores {{d}}/scores.json --score retrieval --out /sys/kernel/v", "cannot write"),
    (f"stream-plan {SMOL} --scores {{d}}/scores.json --keep 0.5 --out /proc/sp.json", "cannot write"),
    (f"validate {SMOL} --scores {{d}}/scores.json --score retrieval --out {{d}}/edited_progress",
     "was changed after headlab wrote it"),
    (f"validate {SMOL} --scores {{d}}/scores.json --score retrieval --out {{d}}/own_plotly --overwrite",
     "headlab did not write it"),
    (f"atlas {SMOL} --out {{d}}/own_plotly --overwrite", "headlab did not write it"),
    (f"view {SMOL} --text abc --out {{d}}/own_plotly/view.html", "headlab did not write it"),
    (f"stream-eval {SMOL} --rules random --lengths 200000 --out {{d}}/e", "of memory at its peak (estimated from the "
     "model and the settings)"),
    (f"stream-eval {SMOL} --rules none --scorers snapkv --budgets 0.01 --out {{d}}/e", "smallest budget is"),
    (f"stream-eval {SMOL} --rules none --scorers snapkv --budgets 0.3 --press-window 4000 --out {{d}}/e",
     "fewer than the"),
    (f"stream-eval {SMOL} --rules none --scorers nonsense --out {{d}}/e", "unknown token scorer 'nonsense'"),
    (f"stream-eval {SMOL} --rules none --scorers snapkv --hybrids razor:2:64 --out {{d}}/e", "WHOLE is a fraction"),
    (f"stream-eval {SMOL} --rules none --scorers snapkv --hybrids razor:0.1:64 --out {{d}}/e",
     "needs a scores file with echo, razor_induction"),
    (f"stream-eval {SMOL} --rules none --scorers snapkv --allocations scores --out {{d}}/e",
     "write uniform, pool or scores:RULE"),
    (f"stream-eval {SMOL} --rules none --scorers snapkv --modes sideways --out {{d}}/e", "sideways"),
    (f"stream-eval {SMOL} --rules random --tasks nonsense --out {{d}}/e", "unknown long task(s) nonsense"),
    (f"stream-eval {SMOL} --rules random --tasks niah_single --task-prompts 0 --out {{d}}/e", "--task-prompts"),
    (f"stream-eval {SMOL} --rules random --split selection --needles 5 --out {{d}}/e", "--split selection has 3"),
    (f"validate {SMOL} --scores {{d}}/scores.json --score retrieval --needle-lengths 200000 --out {{d}}/val",
     "lower --needle-lengths or --tokens"),
    ("stream-eval {d}/converted --base none --out {d}/stale_progress", "holds a compression of other settings"),
    (f"validate {SMOL} --scores {{d}}/scores.json --score retrieval --out {{d}}/stale_progress",
     "holds a validation of other settings"),
    ("train-gates {d}/converted --out {d}/g", "gate training needs softmax attention in every layer"),
    ("calibrate {d}/converted --task arithmetic --layers 3-5 --out {d}/c.json",
     "--layers: layers 3-4 are converted to linear attention"),
    ("convert {d}/converted --out {d}/cv", "is a converted checkpoint already (layers 3-4); convert its base model"),
    (f"report {SMOL} --out {{d}}/r --page-only --windows 2", "it takes --views, not --windows"),
    (f"report {SMOL} --out {{d}}/r --families induction,bogus", "not one of"),
    (f"report {SMOL} --out {{d}}/r --families induction,,gradient", "empty item"),
    (f"report {SMOL} --out {{d}}/r --sink-ratio nan", "finite"),
    (f"report {SMOL} --out {{d}}/r --probe-data {{d}}/probe_lists.jsonl", "label"),
    (f"report {SMOL} --out {{d}}/r --probe-pool max", "--probe-pool"),
    (f"report {SMOL} --out {{d}}/r --needle-lengths 64", "minimum 128"),
    (f"report {SMOL} --out {{d}}/r --needle-depths 0.5,1.5", "at most 1.0"),
    (f"report {SMOL} --out {{d}}/r --needles 4", "maximum 3"),
    (f"report {SMOL} --out {{d}}/user.txt", "is a file"),
    (f"report {SMOL} --out {{d}}/precious", "headlab did not write (scores.json)"),
    ("report {d}/tinyconverted --out {d}/r --tokens 5000", "converted to linear attention"),
    ("stream-eval {d}/tinyconverted_truncated --base none --out {d}/se", "the file is truncated or damaged"),
    ("stream-eval {d}/tinyconverted_layer99 --base none --out {d}/se", "names layer(s) [99], but the config has 3"),
    ("report {d}/tinyconverted --out {d}/r --max-memory 1GB", "a converted checkpoint, which loads in memory only"),
    (f"report {SMOL} --out {{d}}/precious --overwrite --windows -3", "--windows"),
    (f"report {SMOL} --out {{d}}/r --max-memory lots", "memory size"),
    ("report smollm2-13m --out {d}/r", "did you mean 'smollm2-135m'"),
    ("report ./no/such/model --out {d}/r", "does not exist"),
    ("report minilm-l6 --out {d}/r --tokens 1000", "longer than the 512 positions"),
    ("report {d}/pickled --out {d}/r --families none --windows 1", "refuses to unpickle"),
    (f"report {SMOL} --out {{d}}/stray_report", "missing key(s) ['heads', 'items', 'k'"),
    (f"report {SMOL} --out {{d}}/stray_compression", "summary row 0"),
    (f"report {SMOL} --out {{d}}/r --prompt-style book", "--prompt-style"),
    # calibrate
    (f"calibrate {SMOL} --out {{d}}/p.json --task bogus", "neither a built-in task"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task {{d}}/tasks_str_choices.jsonl", "choices: 'abc' is not a list"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task {{d}}/tasks_label_float.jsonl", "label: 1.9"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task {{d}}/tasks_label_true.jsonl", "label: True"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task {{d}}/tasks_empty_choices.jsonl", "at least 2"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task {{d}}/tasks_array.jsonl", "expected a JSON object"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task {{d}}/tasks_unknown_key.jsonl", "unknown key"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --size 0", "--size"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --seed -2", "--seed"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --batch-size 0", "--batch-size"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --layers 5-2", "empty"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --layers x", "not an index"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --layers 0-3", "never calibrated"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --layers 40", "outside 0..29"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --beta 1.5", "--beta"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --beta nan", "finite"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --threshold -0.1", "--threshold"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --margin 2", "--margin"),
    (f"calibrate {SMOL} --out {{d}}/user.txt --task kv-recall", "headlab did not write it"),
    (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --progress {{d}}/user.txt", "headlab did not write"),
    ("calibrate minilm-l6 --out {d}/p.json --task kv-recall", "not a causal language model"),
    (f"calibrate {SMOL} --out {{d}}/p.json", "--task"),
    # eval
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_layer_str.json", "'5' is not an integer"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_layer_float.json", "5.5"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_heads_str.json", "'12' is not a list"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_scale_nan.json", "finite"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_scale_huge.json", "at most 1000"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_edits_str.json", "not a list"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_unknown_shape.json", "unknown key"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_wrong_shape.json", "made for a model"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_calibrate_nan.json", "finite"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/user.txt", "not JSON"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --split train", "--split"),
    (f"eval {SMOL} --out {{d}}/precious --task kv-recall", "is a folder"),
    ("eval minilm-l6 --out {d}/e.json --task kv-recall", "not a causal language model"),
    # view
    (f"view {SMOL} --text hi --out {{d}}/v.html --head 17", "LAYER.HEAD"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --head 17.9", "heads are 0..8"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --head 40.1", "outside 0..29"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --head 1.2 --layers 3-4", "does not record"),
    (f"view {SMOL} --text-file {{d}} --out {{d}}/v.html", "is a folder"),
    (f"view {SMOL} --file {{d}}/text.txt --out {{d}}/v.html", "--file is spelled --text-file now"),
    (f"view {SMOL} --text-file {{d}}/missing.txt --out {{d}}/v.html", "does not exist"),
    (f"view {SMOL} --text ' ' --out {{d}}/v.html", "empty"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --layers 5-2", "empty"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --max-payload-mb 0", "--max-payload-mb"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --max-tokens 0", "--max-tokens"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --plotlyjs svg", "--plotlyjs"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --compare {{d}}/plan_heads_str.json", "'12'"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --scores {{d}}/scores_bad.json", "rows of different lengths"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --scores {{d}}/scores_shape.json", "layers x heads"),
    (f"view {SMOL} --text hi --out {{d}}/v.html --export {{d}}/fig.txt", ".png, .svg or .pdf"),
    (f"view {SMOL} --text hi --out {{d}}/user.txt", "headlab did not write it"),
    (f"view {SMOL} --text 'a b c d e f g' --out {{d}}/v.html --max-tokens 2", "more than --max-tokens"),
    # validate
    (f"validate {SMOL} --scores {{d}}/missing.json --out {{d}}/val", "does not exist"),
    (f"validate {SMOL} --scores {{d}}/scores_bad.json --out {{d}}/val", "rows of different lengths"),
    (f"validate {SMOL} --scores {{d}}/scores.json --score nope --out {{d}}/val", "has no score 'nope'"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --ks 0", "--ks"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --ks 5,x", "not an integer"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --ks 100000", "only 270 heads have a score"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --random-sets 0", "--random-sets"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --exclude-above nan", "--exclude-above"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --mode query", "--mode"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --random-seed 2", "--random-seed is spelled --seed now"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --bootstrap 5", "--bootstrap"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --needle-depths 0.5,2", "--needle-depths"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --needles 7", "--needles"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --prompt-style book", "--prompt-style"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --text-file {{d}}/missing.txt", "does not exist"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --metric recall", "--metric"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --needle-lengths 10", "minimum 128"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --windows 0", "--windows"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --tokens 1", "--tokens"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/val --seed -1", "--seed"),
    (f"validate {SMOL} --scores {{d}}/scores.json --out {{d}}/precious", "headlab did not write"),
    # stream-plan
    (f"stream-plan {SMOL} --scores {{d}}/scores.json --out {{d}}/s.json --keep 1.5", "--keep"),
    (f"stream-plan {SMOL} --scores {{d}}/scores.json --out {{d}}/s.json --sinks -1", "--sinks"),
    (f"stream-plan {SMOL} --scores {{d}}/scores.json --out {{d}}/s.json --window 0", "--window"),
    (f"stream-plan {SMOL} --scores {{d}}/missing.json --out {{d}}/s.json", "does not exist"),
    (f"stream-plan {SMOL} --scores {{d}}/scores_shape.json --out {{d}}/s.json", "layers x heads"),
    (f"stream-plan {SMOL} --scores {{d}}/scores.json --score nope --out {{d}}/s.json", "has no score(s) nope"),
    (f"stream-plan {SMOL} --scores {{d}}/scores.json --out {{d}}/user.txt", "headlab did not write"),
    ("stream-plan minilm-l6 --scores {d}/scores.json --out {d}/s.json", "not a causal language model"),
    (f"stream-plan {SMOL} --scores {{d}}/scores.json --score razor --out {{d}}/s.json",
     "has no score(s) echo, razor_induction"),
    (f"stream-plan {SMOL} --out {{d}}/s.json", "needs a scores file with retrieval"),
    (f"stream-plan {SMOL} --score random --compensate --seed -1 --out {{d}}/s.json", "--seed"),
    # stream-eval
    (f"stream-eval {SMOL} --out {{d}}/e --rules razor --scores {{d}}/scores.json", "echo, razor_induction"),
    (f"stream-eval {SMOL} --out {{d}}/e", "needs a scores file with retrieval"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random,random", "repeats"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --keeps 1.5", "--keeps"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --random-sets 0", "--random-sets"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --lengths 64", "--lengths"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --needle-depths 2", "--needle-depths"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --needles 9", "--needles"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --windows 0", "--windows"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --window 0 --compensate", "--window"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --sinks -1", "--sinks"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --prompt-style chat", "--prompt-style"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --text-file {{d}}/missing.txt", "does not exist"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --seed -2", "--seed"),
    (f"stream-eval {SMOL} --out {{d}}/e --scores {{d}}/missing.json", "does not exist"),
    (f"stream-eval {SMOL} --out {{d}}/e --scores {{d}}/scores_shape.json", "layers x heads"),
    (f"stream-eval {SMOL} --out {{d}}/e --scores {{d}}/scores.json --scores {{d}}/scores_other.json",
     "in two --scores files"),
    (f"stream-eval {SMOL} --out {{d}}/user.txt --rules random", "user.txt"),
    (f"stream-eval {SMOL} --out {{d}}/e --rules random --max-memory lots", "--max-memory"),
    ("stream-eval minilm-l6 --out {d}/e --rules random", "not a causal language model"),
    # atlas
    (f"atlas {SMOL} --out {{d}}/a --windows 0", "--windows"),
    (f"atlas {SMOL} --out {{d}}/a --tokens 8", "--tokens"),
    (f"atlas {SMOL} --out {{d}}/a --clusters 0", "--clusters"),
    (f"atlas {SMOL} --out {{d}}/a --text-file {{d}}/missing.txt", "does not exist"),
    (f"atlas {SMOL} --out {{d}}/a --seed -1", "--seed"),
    (f"atlas {SMOL} --out {{d}}/a --compare {{d}}/missing.json", "does not exist"),
    (f"atlas {SMOL} --out {{d}}/a --compare {{d}}/plan_wrong_shape.json", "n_layers"),
    (f"atlas {SMOL} {SMOL} --out {{d}}/a --compare {{d}}/plan_wrong_shape.json", "not both"),
    (f"atlas {SMOL} --out {{d}}/a --scores {{d}}/scores_shape.json", "layers x heads"),
    (f"atlas {SMOL} ./nope --out {{d}}/a", "nope"),
    (f"atlas {SMOL} --out {{d}}/precious", "headlab did not write"),
    (f"atlas {SMOL} --out {{d}}/a --max-memory lots", "--max-memory"),
    (f"report {SMOL} --out {{d}}/stray_atlas", "not a head atlas"),
    # train-gates
    (f"train-gates {SMOL} --out {{d}}/g --steps 0", "--steps"),
    (f"train-gates {SMOL} --out {{d}}/g --lr 0", "--lr"),
    (f"train-gates {SMOL} --out {{d}}/g --lam -1", "--lam"),
    (f"train-gates {SMOL} --out {{d}}/g --min-length 8", "--min-length"),
    (f"atlas {SMOL} --out {{d}}/a --clusters 5000", "--clusters 5000: more clusters than the 270 heads"),
    (f"stream-eval {SMOL} --rules random --lengths 128,1024 --out {{d}}/se",
     "--lengths 128: not longer than the 4 sinks and 256-position window"),
    (f"train-gates {SMOL} --out {{d}}/g --max-length 100", "--max-length"),
    (f"train-gates {SMOL} --out {{d}}/g --min-length 4000 --max-length 2000", "above --max-length"),
    (f"train-gates {SMOL} --out {{d}}/g --intervals 0", "--intervals"),
    (f"train-gates {SMOL} --out {{d}}/g --passkeys 0", "--passkeys"),
    (f"train-gates {SMOL} --out {{d}}/g --passkey-words 0", "--passkey-words"),
    (f"train-gates {SMOL} --out {{d}}/g --sinks -1", "--sinks"),
    (f"train-gates {SMOL} --out {{d}}/g --window 0", "--window"),
    (f"train-gates {SMOL} --out {{d}}/g --save-every 0", "--save-every"),
    (f"train-gates {SMOL} --out {{d}}/g --text-file {{d}}/missing.txt", "does not exist"),
    (f"train-gates {SMOL} --out {{d}}/g --max-length 4096 --text-file {{d}}/windows_only.txt", "of the longest sample"),
    (f"train-gates {SMOL} --out {{d}}/g --seed -1", "--seed"),
    (f"train-gates {SMOL} --out {{d}}/precious", "headlab did not write"),
    (f"train-gates {SMOL} --out {{d}}/g --max-memory lots", "--max-memory"),
    ("train-gates minilm-l6 --out {d}/g", "not a causal language model"),
    # sae train
    (f"sae train {SMOL} --out {{d}}/s --layers x", "--layers"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3,4", "one layer per run"),
    (f"sae train {SMOL} --out {{d}}/s --layer 3", "--layer is spelled --layers now"),
    (f"sae train {SMOL} --out {{d}}/s --layers 40", "outside 0..29"),
    (f"sae train {SMOL} --out {{d}}/s", "--layers"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --arch conv", "--arch"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --k 0", "--k"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --k 100000 --expansion 1", "more than the 576 latents"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --expansion 0", "--expansion"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --train-tokens 0", "--train-tokens"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --batch-tokens 0", "--batch-tokens"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --batch-size 64", "--batch-size is spelled --batch-tokens now"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --buffer-tokens 0", "--buffer-tokens"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --lr 0", "--lr"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --lr nan", "finite"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --l1 -1", "--l1"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --resample-every 0", "--resample-every"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --tokens 1", "--tokens"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --context 64", "--context is spelled --tokens now"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --windows 0", "--windows"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --checkpoint-every 0", "--checkpoint-every"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --cache {{d}}/user.txt", "is a file"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --text-file {{d}}/missing.txt", "does not exist"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --text-file {{d}}/latin1.txt", "is not UTF-8 text"),
    (f"sae train {SMOL} --out {{d}}/s --layers 3 --seed -1", "--seed"),
    (f"sae train {SMOL} --out {{d}}/precious --layers 3", "headlab did not write"),
    # sae eval and dashboard
    ("sae eval {d}/missing --out {d}/m.json", "not a folder"),
    ("sae eval {d}/sae_empty --out {d}/m.json", "cfg.json is missing"),
    ("sae eval {d}/sae_no_d_in --out {d}/m.json", "d_in"),
    ("sae eval {d}/sae_d_sae --out {d}/m.json", "W_enc is (576, 1152), the config says (576, 2000)"),
    ("sae eval {d}/sae_truncated --out {d}/m.json", "is not the weights its cfg.json records (SHA-256 differs)"),
    ("sae eval {d}/sae_truncated_unrecorded --out {d}/m.json", "cannot be read as safetensors"),
    ("sae eval {d}/sae_layer_edited --out {d}/m.json", "says layer 5 but its hook_name is 'blocks.3.attn.hook_z'"),
    (f"sae train {SMOL} --layers 5 --cache {{d}}/acts_layer3 --out {{d}}/s",
     "holds other activations (layer 3 there, 5 here)"),
    (f"sae train {SMOL} --layers 3 --tokens 64 --cache {{d}}/acts_layer3 --out {{d}}/s",
     "context 128 there, 64 here; train_windows 1575 there, 3175 here"),
    ("sae eval {d}/sae --out {d}/m.json --windows 0", "--windows"),
    ("sae eval {d}/sae --out {d}/m.json --tokens 1", "--tokens"),
    ("sae eval {d}/sae --out {d}/m.json --seed -1", "--seed"),
    ("sae eval {d}/sae --out {d}/m.json --text-file {d}", "is not a file"),
    ("sae eval {d}/sae --out {d}/m.json --model smollm2-13m", "did you mean"),
    ("sae eval {d}/sae --out {d}/m.json --model minilm-l6", "reads layer 3 with 576 inputs"),
    ("sae eval {d}/sae --out {d}/user.txt", "headlab did not write"),
    ("sae eval {d}/sae --out {d}/m.json --max-memory 3 apples", "memory size"),
    ("sae dashboard {d}/sae --out {d}/f.html --top 100000", "more than the autoencoder's 1152 latents"),
    ("sae dashboard {d}/sae --out {d}/f.html --latents 3,x", "not an integer"),
    ("sae dashboard {d}/sae --out {d}/f.html --latents 99999", "not a latent"),
    ("sae dashboard {d}/sae --out {d}/f.html --windows 0", "--windows"),
    ("sae dashboard {d}/sae --out {d}/f.html --tokens 1", "--tokens"),
    ("sae dashboard {d}/sae --out {d}/f.html --seed -1", "--seed"),
    ("sae dashboard {d}/sae --out {d}/f.html --text-file {d}/missing.txt", "does not exist"),
    ("sae dashboard {d}/sae --out {d}/f.html --model ./nope", "does not exist"),
    ("sae dashboard {d}/sae --out {d}/user.txt", "headlab did not write"),
    # convert
    (f"convert {SMOL} --out {{d}}/c --to linear", "--to"),
    (f"convert {SMOL} --out {{d}}/c --layers 5-2", "empty"),
    (f"convert {SMOL} --out {{d}}/c --layers 40", "outside 0..29"),
    (f"convert {SMOL} --out {{d}}/c --window 0", "--window"),
    (f"convert {SMOL} --out {{d}}/c --feature-dim 0", "--feature-dim"),
    (f"convert {SMOL} --out {{d}}/c --feature-init zeros", "--feature-init"),
    (f"convert {SMOL} --out {{d}}/c --data alpaca", "--data"),
    (f"convert {SMOL} --out {{d}}/c --feature-map x", "--feature-map"),
    (f"convert {SMOL} --out {{d}}/c --sliding --steps 0,0", "trains nothing"),
    (f"convert {SMOL} --out {{d}}/c --steps a", "S1[,S2]"),
    (f"convert {SMOL} --out {{d}}/c --steps 1,2,3", "more than two"),
    (f"convert {SMOL} --out {{d}}/c --loss kl", "--loss"),
    (f"convert {SMOL} --out {{d}}/c --lr1 0", "--lr1"),
    (f"convert {SMOL} --out {{d}}/c --lr2 -1", "--lr2"),
    (f"convert {SMOL} --out {{d}}/c --tokens 4", "--tokens"),
    (f"convert {SMOL} --out {{d}}/c --seq-len 64", "--seq-len is spelled --tokens now"),
    (f"convert {SMOL} --out {{d}}/c --accumulation 0", "--accumulation"),
    (f"convert {SMOL} --out {{d}}/c --eval-every 0", "--eval-every"),
    (f"convert {SMOL} --out {{d}}/c --windows 0", "--windows"),
    (f"convert {SMOL} --out {{d}}/c --text-file {{d}}/missing.txt", "does not exist"),
    (f"convert {SMOL} --out {{d}}/c --seed -1", "--seed"),
    (f"convert {SMOL} --out {{d}}/precious", "headlab did not write"),
    (f"convert {SMOL} --out {{d}}/c --stage2-loss mse", "--stage2-loss"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads nope --scores {{d}}/scores.json", "has no score(s) nope"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads uniform --softmax-unit rows", "--softmax-unit"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads uniform --softmax-keep 1.5", "--softmax-keep"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads uniform --softmax-keep 1", "nothing would be converted"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads uniform --softmax-cache 0", "--softmax-cache"),
    (f"convert {SMOL} --out {{d}}/c --cache-length 0", "--cache-length"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads kl --kl-windows 9000", "above the 800 training windows"),
    (f"convert {SMOL} --out {{d}}/c --softmax-keep 0.5", "--softmax-keep need(s) --softmax-heads RULE"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads random --softmax-keep 0.5 --softmax-cache 0.3", "give one"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads random --kl-windows 3", "--kl-windows is read by"),
    (f"convert {SMOL} --out {{d}}/c --softmax-heads retrieval --scores {{d}}/scores_another.json", "another model"),
    (f"stream-plan {SMOL} --scores {{d}}/scores_another.json --score retrieval --keep 0.5 --out {{d}}/sp.json",
     "measured on 'another-model', not 'smollm2-135m'"),
    (f"stream-eval {SMOL} --scores {{d}}/scores_another.json --rules retrieval --out {{d}}/se", "another model"),
    (f"validate {SMOL} --scores {{d}}/scores_another.json --score retrieval --out {{d}}/v", "another model"),
    (f"atlas {SMOL} --scores {{d}}/scores_another.json --out {{d}}/a", "another model"),
    (f"stream-plan {SMOL} --scores {{d}}/scores_duplicate.json --score retrieval --keep 0.5 --out {{d}}/sp.json",
     "scores_duplicate.json gives the key 'retrieval' twice in one object"),
    (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_duplicate.json", "gives the key 'model' twice"),
    (f"view {SMOL} --text abc --scores {{d}}/scores_another.json --out {{d}}/v.html", "another model"),
    (f"convert {SMOL} --out {{d}}/c --scores {{d}}/scores.json", "--scores is read by --softmax-heads"),
    (f"convert {SMOL} --out {{d}}/c --gate-lengths 32", "--gate-lengths"),
    (f"convert {SMOL} --out {{d}}/c --gate-needles 7", "--gate-needles"),
    ("convert minilm-l6 --out {d}/c", "not a causal language model"),
    ("convert {d}/tinymodel --out {d}/tinymodel", "source model's folder itself"),
    ("convert {d}/tinymodel --out {d}/tinymodel/converted --overwrite", "source model's folder itself or inside"),
]

# Every kind of file a command reads, with a damaged, a mismatched (another model's, other settings'
# or another kind's file) and a hostile case (built to hang, exhaust or escape the reader); FILE_OPTIONS
# maps each option that reads a file to its kind, and a test below keeps both complete.
FILE_KINDS = {
    "model folder": {
        "damaged": ("stream-eval {d}/tinyconverted_truncated --base none --out {d}/se", "truncated or damaged"),
        "mismatched": ("stream-eval {d}/converted --base {d}/tinymodel --out {d}/se", "in shape and vocabulary size"),
        "hostile": ("report {d}/pickled --out {d}/r --families none --windows 1", "refuses to unpickle"),
    },
    "scores": {
        "damaged": (f"stream-plan {SMOL} --scores {{d}}/scores_bad.json --keep 0.5 --out {{d}}/sp.json", "values"),
        "mismatched": (f"atlas {SMOL} --scores {{d}}/scores_another.json --out {{d}}/a", "another model"),
        "hostile": (f"view {SMOL} --text abc --scores {{d}}/scores_deep.json --out {{d}}/v.html",
                    "nests its JSON too deeply"),
    },
    "plan": {
        "damaged": (f"eval {SMOL} --out {{d}}/e.json --task kv-recall --plan {{d}}/plan_edits_str.json", "edits"),
        "mismatched": (f"view {SMOL} --text abc --compare {{d}}/plan_wrong_shape.json --out {{d}}/v.html",
                       "made for a model of shape"),
        "hostile": (f"apply {SMOL} --plan {{d}}/plan_fifo.json --out {{d}}/ap", "is not a regular file"),
    },
    "text": {
        "damaged": (f"atlas {SMOL} --text-file {{d}}/latin1.txt --out {{d}}/a", "is not UTF-8 text"),
        "mismatched": (f"report {SMOL} --out {{d}}/r --text-file {{d}}/text.txt", "too short for 8 windows"),
        "hostile": (f"sae dashboard {{d}}/sae --text-file {{d}}/huge.txt --out {{d}}/f.html",
                    "is 300 MiB, more than the 256 MiB headlab reads"),
    },
    "labelled texts": {
        "damaged": (f"report {SMOL} --out {{d}}/r --probe-data {{d}}/probe_lists.jsonl", "label"),
        "mismatched": (f"report {SMOL} --out {{d}}/r --probe-data {{d}}/tasks_label_true.jsonl", "text"),
        "hostile": (f"report {SMOL} --out {{d}}/r --probe-data {{d}}/probe_deep.jsonl", "nests its JSON too deeply"),
    },
    "task file": {
        "damaged": (f"eval {SMOL} --out {{d}}/e.json --task {{d}}/tasks_label_float.jsonl", "label: 1.9"),
        "mismatched": (f"calibrate {SMOL} --out {{d}}/p.json --task {{d}}/probe_as_tasks.jsonl", "prompt"),
        "hostile": (f"eval {SMOL} --out {{d}}/e.json --task {{d}}/tasks_fifo.jsonl", "nor a JSONL file"),
    },
    "journal": {
        "damaged": (f"validate {SMOL} --scores {{d}}/scores.json --score retrieval --out {{d}}/edited_progress",
                    "was changed after headlab wrote it"),
        "mismatched": (f"stream-eval {SMOL} --rules random --out {{d}}/stale_progress", "of other settings"),
        "hostile": (f"calibrate {SMOL} --out {{d}}/p.json --task kv-recall --progress {{d}}/stale_progress/"
                    "compression.progress.json", "is not a calibration progress file"),
    },
    "activation cache": {
        "damaged": (f"sae train {SMOL} --layers 3 --cache {{d}}/acts_damaged --out {{d}}/s",
                    "is missing or not the 100 bytes"),
        "mismatched": (f"sae train {SMOL} --layers 5 --cache {{d}}/acts_layer3 --out {{d}}/s", "layer 3 there, 5 here"),
        "hostile": (f"sae train {SMOL} --layers 3 --cache {{d}}/acts_escape --out {{d}}/s", "is missing or not"),
    },
    "SAE folder": {
        "damaged": ("sae eval {d}/sae_truncated --out {d}/m.json", "SHA-256 differs"),
        "mismatched": ("sae dashboard {d}/sae_layer_edited --out {d}/f.html", "hook_name"),
        "hostile": ("sae eval {d}/sae_deep --out {d}/m.json", "nests its JSON too deeply"),
    },
    "training state": {
        "damaged": (f"train-gates {SMOL} --max-length 2048 --out {{d}}/gates_damaged", "cannot resume gate training"),
        "mismatched": (f"train-gates {SMOL} --max-length 2048 --out {{d}}/gates_other", "other settings"),
        "hostile": (f"train-gates {SMOL} --max-length 2048 --out {{d}}/gates_pickle", "(UnpicklingError)"),
    },
}
FILE_OPTIONS = {  # (the option, or the positional's metavar) -> the kind of file it reads
    "MODEL": "model folder", "--model": "model folder", "--base": "model folder", "MODEL2": "model folder",
    "--scores": "scores", "--plan": "plan", "--compare": "plan", "--text-file": "text", "--probe-data": "labelled texts",
    "--task": "task file", "--progress": "journal", "--cache": "activation cache", "SAE_DIR": "SAE folder",
}
# commands whose --out holds what a rerun resumes from (a journal or a training state)
RESUMED_OUTPUTS = {"stream-eval": "journal", "validate": "journal", "train-gates": "training state",
                   "convert": "training state"}
CLI_CASES += [case for cases in FILE_KINDS.values() for case in cases.values()]


def _snapshot(folder: Path) -> dict:
    """Each entry's content hash (large files: size and modification time; pipes and folders: their kind)."""
    def state(p: Path):
        if not p.is_file():
            return "dir" if p.is_dir() else "special"
        info = p.stat()
        return (info.st_size, info.st_mtime_ns) if info.st_size > 2**20 else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(folder)): state(p) for p in sorted(folder.rglob("*"))}


def _argv(line: str, sandbox: Path) -> list[str]:
    import shlex

    return shlex.split(line.replace("{d}", str(sandbox)))


@pytest.mark.parametrize("line, fragment", CLI_CASES, ids=[line.split(" --")[0].split(" {")[0][:28] + f"-{i}"
                                                           for i, (line, _) in enumerate(CLI_CASES)])
def test_bad_input_is_one_line_before_work_and_writes_nothing(sandbox, capsys, line, fragment):
    before = _snapshot(sandbox)
    start = time.perf_counter()
    try:
        status = main(_argv(line, sandbox))
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip() and "%|" not in text]  # progress bars aside
    assert status == 2, err
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert _snapshot(sandbox) == before, "a refused command changed or created files"
    assert elapsed < 30, f"refused only after {elapsed:.0f} s"


def test_every_option_of_every_command_has_a_bad_input_case():
    """(Old spellings, refused in every command, are checked by test_cli_defaults.py.)"""
    parser = build_parser()
    seen = " ".join(line for line, _ in CLI_CASES)
    missing = []
    for name, command in _commands(parser):
        for action in command._actions:
            if isinstance(action, Renamed):
                continue
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and f"{flag} " not in seen + " ":
                    missing.append(f"{name} {flag}")
    assert not missing, missing


def _commands(parser, prefix=""):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                if any(hasattr(a, "choices") and isinstance(a.choices, dict) for a in sub._actions):
                    yield from _commands(sub, f"{prefix}{name} ")
                else:
                    yield f"{prefix}{name}", sub


def test_every_file_a_command_reads_has_a_damaged_a_mismatched_and_a_hostile_case():
    """A new option that reads a file lands with its kind in FILE_OPTIONS, and every kind has its three
    cases (they run with the others above)."""
    import argparse

    reading = {"MODEL", "MODEL2", "SCORES", "PLAN", "SAE_DIR", "FILE", "TASK,..."}
    unmapped = []
    for name, command in _commands(build_parser()):
        for action in command._actions:
            key = action.option_strings[0] if action.option_strings else action.metavar
            reads = action.metavar in reading and action.option_strings[:1] != ["--export"]
            if (reads or key in FILE_OPTIONS) and key not in FILE_OPTIONS and not isinstance(action, argparse._HelpAction):
                unmapped.append(f"{name} {key}")
    assert not unmapped, f"options that read files without a kind in FILE_OPTIONS: {unmapped}"
    for kind in {*FILE_OPTIONS.values(), *RESUMED_OUTPUTS.values()}:
        assert set(FILE_KINDS.get(kind, {})) == {"damaged", "mismatched", "hostile"}, kind


def test_help_and_argument_errors_answer_at_once(capsys):
    """No model, no torch import needed: both answer in well under a second even on a busy CI box."""
    import subprocess
    import sys

    for argv, status in ((["--help"], 0), (["report", SMOL, "--out", "x", "--windows", "0"], 2)):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "headlab", *argv], capture_output=True, text=True)
        assert done.returncode == status, done.stderr
        assert time.perf_counter() - start < 3.0
        assert "torch" not in done.stderr


API_CASES = [
    ("HeadScale with a boolean layer", lambda: _surgeon().HeadScale(True, (0,))),
    ("HeadScale with a fractional head", lambda: _surgeon().HeadScale(1, (0.7,))),
    ("HeadScale with heads as a string", lambda: _surgeon().HeadScale(1, "12")),
    ("HeadScale with a NaN scale", lambda: _surgeon().HeadScale(1, (0,), math.nan)),
    ("Calibrate with a negative threshold", lambda: _surgeon().Calibrate(2, (0,), threshold=-1.0)),
    ("Steer with alpha 0", lambda: _surgeon().Steer(2, (0,), alpha=0.0)),
    ("Taps with a boolean layer", lambda: _surgeon().Taps(attention={True: None})),
    ("Taps with a fractional head", lambda: _surgeon().Taps(attention={1: (0.5,)})),
    ("Request with a string span", lambda: _request_span("0:3")),
    ("Plan with an edit that is a list", lambda: _surgeon().Plan.from_dict({"format": "headlab-plan/1",
                                                                             "edits": [[1]]})),
    ("ReportSettings with 0 samples",
     lambda: _report_settings().ReportSettings(text=TextWindows(windows=0, tokens=256))),
    ("ReportSettings with an unknown family", lambda: _report_settings().ReportSettings(families=("nope",))),
    ("NeedleSettings with a depth of 2", lambda: _probe_settings().NeedleSettings(depths=(2.0,))),
    ("MaskingSettings with K 0", lambda: _validation_settings().MaskingSettings(ks=(0,))),
    ("TrainSettings with batch 0", lambda: _sae_settings().TrainSettings(batch_tokens=0)),
    ("TrainSettings with an unknown architecture", lambda: _sae_settings().TrainSettings(arch="conv")),
    ("LinearSettings with window 0", lambda: _conversion().LinearSettings(window=0)),
    ("StageSettings with lr NaN", lambda: _conversion().StageSettings(lr=math.nan)),
    ("TaskSettings without tasks", lambda: _tasks().TaskSettings()),
    ("load_model of a mistyped name", lambda: _surgeon().load_model("smollm2-13m")),
    ("Redistribute with a sink dimension beyond the residual stream",
     lambda: _attached(plan=_surgeon().Plan([_surgeon().Redistribute(2, (0,), sink_dims=(99999,))]))),
    ("attach with NaN gates", lambda: _attached(gates=torch.full((4, 5), math.nan))),
    ("attach with NaN mixing alphas", lambda: _attached(mixing=_nan_mixing())),
]
# the API cases whose message is checked too (the others' come from the settings' checks)
API_FRAGMENTS = {"Redistribute with a sink dimension beyond the residual stream": "sink_dims [99999] lie beyond the "
                 "residual stream's 30 dimensions", "attach with NaN gates": "gates hold values that are not finite",
                 "attach with NaN mixing alphas": "alphas hold values that are not finite"}


def _attached(**kwargs):
    with _surgeon().attach(tiny_llama("mha", layers=4), **kwargs):
        pass


def _nan_mixing():
    from headlab.surgeon.streaming.mixing import StreamMix

    return StreamMix(torch.full((4, 5), math.nan), layers=(0, 1, 2, 3), sinks=1, window=2)


def _surgeon():
    import headlab.surgeon as surgeon

    return surgeon


def _probe_settings():
    import headlab.probes.scorers.settings as settings

    return settings


def _validation_settings():
    import headlab.probes.validation.settings as settings

    return settings


def _report_settings():
    import headlab.probes.report.settings as settings

    return settings


def _sae_settings():
    import headlab.sae.settings as settings

    return settings


def _conversion():
    import headlab.surgeon.conversion.settings as settings

    return settings


def _tasks():
    import headlab.surgeon.search.tasks as tasks

    return tasks


def _request_span(span):
    from headlab.surgeon.request import span_mask

    return span_mask(span, 1, 5, "span")


@pytest.mark.parametrize("name, call", API_CASES, ids=[name for name, _ in API_CASES])
def test_bad_api_input_raises_one_line(name, call):
    with pytest.raises(HeadlabError) as err:
        call()
    assert "\n" not in str(err.value) and str(err.value).strip()
    assert API_FRAGMENTS.get(name, "") in str(err.value)


@pytest.mark.slow
@pytest.mark.real_model
def test_ctrl_c_stops_with_one_line_saying_what_was_kept(tmp_path):
    """SIGINT while the report scores its windows: exit 130, one line naming the scores file and how
    to finish, no traceback, and the scores so far on disk."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    out = tmp_path / "report"
    # a shell that started this run in the background hands its children SIGINT ignored; Ctrl-C reaches a user's
    # headlab with the default disposition, so the child starts with that
    process = subprocess.Popen([sys.executable, "-m", "headlab", "report", SMOL, "--out", str(out), "--windows", "40",
                                "--families", "none"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               env={**os.environ, "TQDM_MININTERVAL": "0"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, started = [], threading.Event()

    def read():
        for chunk in iter(lambda: process.stderr.read1(4096), b""):
            seen.append(chunk.decode(errors="replace"))
            if "scoring heads" in "".join(seen) and (out / "scores.json").exists():
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), "".join(seen)[-2000:]
    process.send_signal(signal.SIGINT)
    assert process.wait(120) == 130
    reader.join(10)
    err = "".join(seen)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert "interrupted" in last and "scores.json" in last and "the same command resumes" in last, last
    assert json.loads((out / "scores.json").read_text())["complete"] is False
