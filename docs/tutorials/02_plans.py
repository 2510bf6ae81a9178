# %% [markdown]
# # Ablate and calibrate heads with a plan
#
# A plan is a list of edits applied inside `attach(model, plan)`. This tutorial measures a small recall
# task, ablates heads, calibrates attention sinks (ACT) and measures what that does to accuracy, runs
# ACT's head search, and saves a plan as a file the command line reads. The task is small (24 test
# examples, so one answer is about 4 points of accuracy): the numbers show how to measure, not what
# calibration does at scale.

# %%
import tempfile
from pathlib import Path

import torch

from headlab.surgeon import Calibrate, HeadScale, Plan, Taps, attach, load_model
from headlab.surgeon.search.accuracy import evaluate
from headlab.surgeon.search.tasks import load_task

model, tokenizer = load_model("smollm2-135m")
examples = load_task("kv-recall", "test", 24, seed=0)
print(examples[0].context()[-200:], "->", examples[0].choices)

# %% [markdown]
# ## The unedited model, and with heads ablated
#
# `HeadScale(layer, heads, 0.0)` zeroes the heads' outputs before the output projection. Accuracy is
# the fraction of examples whose right choice has the highest log-probability; zeroing every head of
# layers 15 and 16 lowers it.

# %%
baseline = evaluate(model, tokenizer, examples)
ablated = evaluate(model, tokenizer, examples, Plan([HeadScale(layer, tuple(range(9)), 0.0) for layer in (15, 16)]))
print(f"accuracy: unedited {baseline.accuracy:.3f}, layers 15-16 ablated {ablated.accuracy:.3f}")
assert ablated.accuracy < baseline.accuracy

# %% [markdown]
# ## Calibration
#
# ACT finds, at the prefill, the keys each head attends to far more than average (sinks, mean received
# attention above 0.1, sparing the first) and keeps `beta` of their weight, giving the rest to the other
# keys. Printed: the largest change of one attention weight of layer 12 on the first example (weights
# move) and the largest change of a row's sum (rounding only: the rows still sum to one).

# %%
plan = Plan([Calibrate(layer, tuple(range(9)), beta=0.4) for layer in (12, 13)])
ids = tokenizer(examples[0].context(), return_tensors="pt").input_ids
taps = Taps(attention={12: None})
with torch.no_grad(), attach(model, taps=taps) as plain:
    model(input_ids=ids)
with torch.no_grad(), attach(model, plan, taps=taps) as calibrated:
    model(input_ids=ids)
before, after = plain.recording.attention_map(12), calibrated.recording.attention_map(12)
print("largest change of a weight:", float((after - before).abs().max()))
print("largest change of a row sum:", float((after.sum(-1) - before.sum(-1)).abs().max()))
assert float((after - before).abs().max()) > 0.1 and float((after.sum(-1) - before.sum(-1)).abs().max()) < 1e-5

# %% [markdown]
# What calibrating every head of layers 12 and 13 does to accuracy, measured on the same 24 examples:
# on this task it lowers it (the cell prints by how many answers). Calibration moves weight off
# the sinks in every row, and nothing says this helps a given head on a given task; that is why ACT
# does not calibrate heads wholesale but searches for the heads whose calibration helps (next section).

# %%
with_plan = evaluate(model, tokenizer, examples, plan)
change = sum(with_plan.correct) - sum(baseline.correct)
print(f"accuracy: unedited {baseline.accuracy:.3f}, layers 12-13 calibrated {with_plan.accuracy:.3f} "
      f"({change:+d} of {len(examples)} answers)")
assert with_plan.accuracy < baseline.accuracy

# %% [markdown]
# ## ACT's head search
#
# `calibration_search` (what `headlab calibrate` runs) calibrates one candidate head at a time on a
# calibration split, separate from the test examples, and keeps the heads whose accuracy beats the
# unedited model's by more than the margin (0). Here: the nine heads of layer 12 on 12 calibration
# examples. Printed: the unedited accuracy, each head's, and the heads kept. No head's calibration
# raises the accuracy, so the search keeps none and its plan is empty. An empty plan is the unedited
# model: `headlab calibrate` warns when it keeps no head and `headlab eval` warns on a plan with no
# edits; in Python, check `plan.edits` before evaluating, as the cell does (it prints a warning and
# evaluates nothing).

# %%
from headlab.surgeon.search.calibration import SearchSettings, calibration_search, default_candidates, plan_from_search

calibration = load_task("kv-recall", "calibration", 12, seed=0)
search = SearchSettings(("kv-recall",), len(calibration), tuple(default_candidates(model, [12])))
state = calibration_search(model, tokenizer, calibration, search, Path(tempfile.mkdtemp()) / "search.json")
print(f"unedited {state['baseline']:.3f};", ", ".join(f"head {key}: {value:.3f}"
                                                    for key, value in state["heads"].items()))
print("kept:", state["kept"])
searched = plan_from_search(model, "smollm2-135m", state, search.beta, search.threshold)
if not searched.edits:
    print("warning: no head beat the unedited model, so the plan is empty: nothing to evaluate (try more "
          "calibration examples, other layers or another beta)")
else:
    print(f"test accuracy with the searched plan {evaluate(model, tokenizer, examples, searched).accuracy:.3f}")
assert not state["kept"] and not searched.edits

# %% [markdown]
# ## Plans as files
#
# The plan of layers 12 and 13 as JSON, checked when it is read back; `headlab eval smollm2-135m --task
# kv-recall --plan plan.json --out eval.json` runs it from the command line.

# %%
path = Path(tempfile.mkdtemp()) / "plan.json"
plan.save(path, model=model)   # records the model and its shape, checked when the plan is used
print(path.read_text()[:300])
assert Plan.load(path).edits == plan.edits
