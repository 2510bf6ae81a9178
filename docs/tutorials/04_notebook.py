# %% [markdown]
# # headlab in a notebook
#
# Views, atlas and report sections render inline in Jupyter: each `show_*` function returns an object
# whose `_repr_html_` Jupyter displays when it ends a cell. Every output carries plotly.js (it runs only
# where the notebook has none yet), so it renders alone, in a static HTML export of the notebook and on
# this page. Nothing is written to disk except the small report of the last part, in a temporary folder.
# The whole notebook runs in well under a minute on two CPU cores.

# %%
import tempfile
from pathlib import Path

import torch

from headlab.core.text import TextWindows, text_windows
from headlab.probes import (AtlasSettings, ReportSettings, build_atlas, describe_heads, gather_view, show_atlas,
                            show_score, show_view, write_report)
from headlab.probes.atlas.build import atlas_document
from headlab.surgeon import load_model

torch.manual_seed(0)
model, tokenizer = load_model("smollm2-135m")

# %% [markdown]
# ## One prompt's attention
#
# `gather_view` records every head's map of one prompt through headlab's attention hook. The view opens
# on the head with the highest previous-token score; click a head on the grid to open its map, tick
# "hide the first token" to take the sink out of the colours, click a row of the map to colour the text
# by that query's attention.

# %%
prompt = ("The Eiffel Tower is in Paris. The Colosseum is in Rome. The Eiffel Tower is in Paris. "
          "The Colosseum is in Rome.")
ids = tokenizer(prompt, return_tensors="pt").input_ids
data = gather_view(model, tokenizer, ids, "smollm2-135m", progress=False)
output = show_view(data)
previous = data.scores["previous_token"]
layer, head = divmod(int(previous.flatten().argmax()), previous.shape[1])
print(f"{len(data.tokens)} tokens; the view opens on layer {layer}, head {head} "
      f"(previous-token score {float(previous[layer, head]):.2f})")
assert "<script" in output._repr_html_() and "headlabView" in output._repr_html_()
assert float(previous[layer, head]) > 0.5  # a real previous-token head: most of its weight on the token before
output

# %% [markdown]
# ## The head atlas
#
# Every head described by its attention on a few windows of text, embedded in 2D and clustered; the
# legend names the clusters, hovering a point shows that head's pooled map.

# %%
settings = AtlasSettings(text=TextWindows(windows=2, tokens=128), clusters=4)
descriptors = describe_heads(model, text_windows(tokenizer, settings.text, settings.seed), label="smollm2-135m",
                             progress=False)
atlas = build_atlas([descriptors], k=settings.clusters, seed=settings.seed)
doc = atlas_document(atlas, ["smollm2-135m"])
print({row["name"]: row["size"] for row in doc["cluster_table"]})
assert sum(row["size"] for row in doc["cluster_table"]) == 30 * 9  # every head in one cluster
show_atlas(doc)

# %% [markdown]
# ## A report's section
#
# `show_score` reads a report folder's `scores.json` and shows one score's section: its description,
# heatmap over every head (the colour bar says what the value is) and its top heads. Here a small report
# of the pattern scores and the induction score.

# %%
out = Path(tempfile.mkdtemp()) / "report"
report = ReportSettings(text=TextWindows(windows=2, tokens=128), n_views=1, families=("induction",))
write_report(model, tokenizer, "smollm2-135m", out, report, progress=False)
section = show_score(out, "induction", top_k=5)
assert "induction" in section._repr_html_()
section
