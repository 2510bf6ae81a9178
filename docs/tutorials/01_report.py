# %% [markdown]
# # Score the heads of SmolLM2
#
# This tutorial scores every attention head of SmolLM2-135M-Instruct on real text, finds its retrieval
# heads with needle-in-a-haystack runs, and opens the attention of the best one. It uses small settings
# so that it runs in a minute or two on a laptop CPU; the command-line equivalent with the default
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
# `report.html` (open it in a browser), `views.html`, `scores.json` and `scores.csv`, beside the plotly.js
# file the pages load and `.headlab-owned.json`, the list of what headlab wrote there.

# %%
out = Path(tempfile.mkdtemp()) / "report"
settings = ReportSettings(text=TextWindows(windows=4, tokens=128), n_views=2, families=("retrieval",),
                          needles=NeedleSettings(lengths=(512,), depths=(0.25, 0.75), n_needles=1))
page = write_report(model, tokenizer, "smollm2-135m", out, settings, progress=False)
print(sorted(p.name for p in out.iterdir()))

# %% [markdown]
# ## Reading the scores back
#
# Every score is a `[layer, head]` array with the settings that produced it. Printed: the three top
# heads of three scores as `(layer, head, score)`, then each needle run's depth, the start of its
# response and whether it recalled the answer (ROUGE-1 recall above 0.5; only recalled runs count
# towards the retrieval score). A head's retrieval score is the fraction of the answer's tokens it
# copied (its most attended key was that token in the needle when the model wrote it), averaged over
# the recalled runs. A head can rank high in both the sink and the retrieval lists: a retrieval head
# rests on the first token until there is something to copy.

# %%
scores = load_scores_file(out / "scores.json", model_shape(model))
for name in ("sink_first_token", "previous_token", "retrieval"):
    print(name, [(layer, head, round(value, 3)) for layer, head, value in scores[name].top(3)])
runs = scores["retrieval"].settings["runs"]
print([(run["depth"], run["response"][:60], run["recalled"]) for run in runs])
assert all(run["recalled"] for run in runs)

# %% [markdown]
# ## The attention of the best retrieval head
#
# A retrieval head copies: when the model writes a token of the needle's answer, the head's most
# attended key is that same token inside the needle. Hide the third needle, which the score above never
# saw, in the middle of a 512-token haystack and decode greedily as the score does; `greedy_with_top_keys`
# returns the generated tokens and, per step, every head's most attended key. Printed: the response,
# its ROUGE-1 recall of the answer, and the head's copy score on this run (`copy_scores`: the fraction of
# the answer's tokens it copied).

# %%
from headlab.core.text import load_text
from headlab.probes.scorers.needles import NEEDLES
from headlab.probes.scorers.record import record_attention
from headlab.probes.scorers.retrieval import build_prompt, copy_scores, greedy_with_top_keys, rouge1_recall, stop_rule

layer, head, _ = scores["retrieval"].top(1)[0]
needle = NEEDLES[2]
prompt = build_prompt(tokenizer, load_text(None), needle, 512, 0.5)
generated, top_keys = greedy_with_top_keys(model, prompt.input_ids, 24, stop_rule(tokenizer))
response = tokenizer.decode(generated, skip_special_tokens=True)
recall = rouge1_recall(response, needle.answer)
copied = float(copy_scores(prompt, generated, top_keys, "count")[layer, head])
print(f"{response!r}: recall {recall:.2f}, copy score of head ({layer}, {head}) {copied:.2f}")
assert recall > 0.5  # the model recalled the needle

# %% [markdown]
# The copy step is the decode step at which the model writes the answer's first token (` purple`).
# Record the head's attention on the text up to that step: its last row is the one that wrote the
# token. Printed: the row's weight on that token inside the needle beside its weight on the first token
# (the sink) and what a uniform row gives each key. The row that wrote the response's first token
# (`The`, the last prompt row) is printed too: there the head rests on the sink, nothing to copy yet.

# %%
ids = prompt.input_ids[0]
answer = prompt.answer_positions[0]  # the answer's first token inside the needle
step = generated.index(int(ids[answer]))
assert int(top_keys[step][layer, head]) == answer  # the score's copy rule: this head copies at this step
text = torch.cat([prompt.input_ids, torch.tensor([generated[:step]])], dim=1)
maps = record_attention(model, text, tokenizer, layers=[layer], heads=[head]).maps[0, 0]  # [query, key]
copy_row, first_row = maps[-1], maps[len(ids) - 1]
uniform = 1 / len(copy_row)
print(f"head ({layer}, {head}), step {step} writes {tokenizer.decode([int(ids[answer])])!r}: "
      f"{float(copy_row[answer]):.3f} on it in the needle, {float(copy_row[0]):.3f} on the first token "
      f"(uniform {uniform:.4f})")
print(f"the last prompt row: {float(first_row[answer]):.3f} on the needle token, {float(first_row[0]):.3f} "
      "on the first token")
assert int(copy_row.argmax()) == answer and float(copy_row[answer]) > 10 * uniform
assert float(first_row[0]) > 0.5 > float(first_row[answer])
