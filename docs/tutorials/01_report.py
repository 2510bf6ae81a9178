# %% [markdown]
# # Score the heads of SmolLM2
#
# This tutorial scores every attention head of SmolLM2-135M-Instruct on real text, finds its retrieval
# heads with needle-in-a-haystack runs, and opens the attention of the best one. It uses small settings
# so that it runs in about a minute on a laptop CPU; the command-line equivalent with the default
# settings is `headlab report smollm2-135m --out results/report`.

# %%
import tempfile
from pathlib import Path

import torch

from headlab.core.text import TextWindows
from headlab.probes import ReportSettings, write_report
from headlab.core.head_scores import load_scores_file
from headlab.probes.scorers.settings import NeedleSettings
from headlab.surgeon import load_model, model_shape

torch.manual_seed(0)
model, tokenizer = load_model("smollm2-135m")
print(model_shape(model))

# %% [markdown]
# ## The report
#
# Four windows of 128 tokens of Python's standard-library docstrings for the pattern scores, and one
# needle at two depths of a 512-token haystack for the retrieval score. The report folder holds
# `report.html` (open it in a browser), `views.html`, `scores.json` and `scores.csv`.

# %%
out = Path(tempfile.mkdtemp()) / "report"
settings = ReportSettings(text=TextWindows(windows=4, tokens=128), n_views=2, families=("retrieval",),
                          needles=NeedleSettings(lengths=(512,), depths=(0.25, 0.75), n_needles=1))
page = write_report(model, tokenizer, "smollm2-135m", out, settings, progress=False)
print(sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## Reading the scores back
#
# Every score is a `[layer, head]` array with the settings that produced it.

# %%
scores = load_scores_file(out / "scores.json", model_shape(model))
for name in ("sink_first_token", "previous_token", "retrieval"):
    print(name, [(layer, head, round(value, 3)) for layer, head, value in scores[name].top(3)])
runs = scores["retrieval"].settings["runs"]
print([(run["depth"], run["response"][:60], run["recalled"]) for run in runs])

# %% [markdown]
# ## The attention of the best retrieval head
#
# Record that head's map on a needle prompt and see where its last row looks: a retrieval head puts
# its weight on the needle.

# %%
from headlab.core.text import load_text
from headlab.probes.scorers.needles import NEEDLES
from headlab.probes.scorers.record import record_attention
from headlab.probes.scorers.retrieval import build_prompt

layer, head, _ = scores["retrieval"].top(1)[0]
prompt = build_prompt(tokenizer, load_text(None), NEEDLES[0], 512, 0.5)
record = record_attention(model, prompt.input_ids, tokenizer, layers=[layer], heads=[head])
row = record.maps[0, 0, -1]  # the last prompt row: [key]
top = row.topk(5)
needle = set(prompt.answer_positions)
print(f"head ({layer}, {head}): mass on the answer span {float(row[prompt.answer_positions].sum()):.3f}")
print([(int(k), tokenizer.decode([int(prompt.input_ids[0, k])]), round(float(w), 3), int(k) in needle)
       for w, k in zip(top.values, top.indices)])
