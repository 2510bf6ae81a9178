# %% [markdown]
# # Ablate and calibrate heads with a plan
#
# A plan is a list of edits applied inside `attach(model, plan)`. This tutorial measures a small recall
# task, ablates heads and calibrates attention sinks (ACT), checks that calibration keeps every row's
# sum, and saves the plan as a file the command line reads.

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
# `HeadScale(layer, heads, 0.0)` zeroes the heads' outputs before the output projection.

# %%
baseline = evaluate(model, tokenizer, examples)
ablated = evaluate(model, tokenizer, examples, Plan([HeadScale(layer, tuple(range(9)), 0.0) for layer in (15, 16)]))
print(f"accuracy: unedited {baseline.accuracy:.3f}, layers 15-16 ablated {ablated.accuracy:.3f}")

# %% [markdown]
# ## Calibration
#
# ACT finds, at the prefill, the keys each head attends to far more than average (sinks, mean received
# attention above 0.1, sparing the first) and keeps `beta` of their weight, giving the rest to the other
# keys. The rows still sum to one.

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
print(f"accuracy calibrated: {evaluate(model, tokenizer, examples, plan).accuracy:.3f}")

# %% [markdown]
# ## Plans as files
#
# The same plan as JSON, checked when it is read back; `headlab eval smollm2-135m --task kv-recall
# --plan plan.json --out eval.json` runs it from the command line.

# %%
path = Path(tempfile.mkdtemp()) / "plan.json"
plan.save(path, model=model)   # records the model and its shape, checked when the plan is used
print(path.read_text()[:300])
assert Plan.load(path).edits == plan.edits
